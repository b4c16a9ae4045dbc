"""Generation split over ranks (ctxdiff/distributed.py): N processes write exactly the files of one."""

import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from ctxdiff import distributed
from ctxdiff.errors import UsageError
from ctxdiff.formats.t2i import DEFAULT_MODEL

PROMPTS = ["a red circle", "a blue square above a green cross", "a yellow triangle"]   # 3: an uneven split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_share_gives_rank_r_the_jobs_i_with_i_mod_world_equal_r(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        assert distributed.rank_and_world() == (rank, 3)
        shares.append(distributed.share(list(range(8))))
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert distributed.merge_in_job_order(shares) == list(range(8))


def test_one_process_without_torchrun_variables_makes_every_job(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.rank_and_world() == (0, 1) and distributed.share("abc") == ["a", "b", "c"]
    assert distributed.gather(5) == [5] and distributed.from_main(7) == 7


@pytest.mark.parametrize("rank, world", [("2", "2"), ("x", "2"), ("0", "0")])
def test_a_rank_outside_the_world_is_a_usage_error(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(UsageError, match="RANK"):
        distributed.rank_and_world()


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_process_and_two_ranks(common: list[str], out_flag: str, tmp_path):
    """`python -m ctxdiff COMMON OUT_FLAG tmp/one` and the same under `torchrun --nproc_per_node 2` into
    tmp/two (both must succeed): their CompletedProcess results."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "ctxdiff", *common, out_flag, str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ctxdiff", *common, out_flag, str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return one, two


def _params(pipe):
    return replace(pipe.defaults, steps=2, sr_steps=2)


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pathlib import Path

    from ctxdiff.pipelines.batch_generate import generate_to_folder
    from ctxdiff.pipelines.text2image import Text2Image

    distributed.join(torch.device("cpu"))
    assert torch.distributed.get_backend() == "gloo"
    pipe = Text2Image.from_bundle(DEFAULT_MODEL, "cpu")
    generate_to_folder(pipe, PROMPTS, Path(folder), 11, _params(pipe), batch_size=2)
    distributed.leave()


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
def test_two_gloo_ranks_write_byte_identical_files_to_one_process(tmp_path, monkeypatch):
    from ctxdiff.pipelines.batch_generate import generate_to_folder
    from ctxdiff.pipelines.text2image import Text2Image

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    pipe = Text2Image.from_bundle(DEFAULT_MODEL, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # as the ranks (torchrun's default): the thread count moves the last bits too
    try:
        generate_to_folder(pipe, PROMPTS, tmp_path / "one", 11, _params(pipe), batch_size=2)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert list(one) == ["00000.png", "00001.png", "00002.png"]
    assert two == one


def test_torchrun_generate_writes_the_files_of_one_process_and_one_table(tmp_path):
    import json

    from ctxdiff.models.latent import save_compvis
    from tiny_sd import tiny_sd_models

    sd = save_compvis(tmp_path / "tiny-sd.safetensors", tiny_sd_models(0))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square --negative a green cross\na yellow triangle\n")
    common = ["--json", "--device", "cpu", "generate", "--from-file", str(prompts), "--model", str(sd), "-n", "2",
              "--steps", "2", "--seed", "9", "--batch-size", "2", "--grid"]
    one, two = _one_process_and_two_ranks(common, "--out", tmp_path)
    files = _files(tmp_path / "one")
    assert len(files) == 7 and "grid.png" in files          # 3 prompts x 2 images, and the grid
    assert _files(tmp_path / "two") == files

    def records(stdout: str) -> list[dict]:
        return sorted(({**r, "path": os.path.basename(r["path"])} for r in map(json.loads, stdout.splitlines())),
                      key=lambda r: r["path"])

    assert records(two.stdout) == records(one.stdout)
    assert two.stderr.count("seed 9") == 1


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
def test_torchrun_evaluate_zero_shot_splits_the_images_and_measures_what_one_process_does(tmp_path):
    """The zero-shot FID protocol under torchrun: the ranks share the images (the same files, byte for
    byte), rank 0 alone measures and prints one result, equal to one process's."""
    import json

    from ctxdiff.shapes.datasets import write_samples

    write_samples(tmp_path / "real", 6, seed=5, size=64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na yellow triangle\na green cross\na white circle\n")
    common = ["--json", "--device", "cpu", "evaluate", "--metric", "fid", "--model", str(DEFAULT_MODEL),
              "--prompts", str(prompts), "-n", "5", "--steps", "2", "--batch-size", "2", "--real", str(tmp_path / "real"),
              "--features", f"clip:shapes-clip:{DEFAULT_MODEL}"]
    one, two = _one_process_and_two_ranks(common, "--fake", tmp_path)
    files = _files(tmp_path / "one")
    assert sum(name.endswith(".png") for name in files) == 5
    assert _files(tmp_path / "two") == files
    first, second = json.loads(one.stdout), json.loads(two.stdout)      # one JSON line: rank 0's
    assert "generate 5 for fid 5/5" in one.stderr and "generate 5 for fid 3/3" in two.stderr   # rank 0: batches 0, 2
    assert second.pop("fake") != first.pop("fake") and second == first
