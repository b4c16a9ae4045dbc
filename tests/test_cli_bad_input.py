"""Each bad input of issue 18 as the command a user typed, its exit code (docs/exit-codes.md: 1 a
problem with files or data, 2 a usage mistake) and its one line; every file that was there before
is byte-identical afterwards (checked by `Workspace.run`, tests/cli_fuzz.py, for every case)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_fuzz import Workspace

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("bad-input") / "ws")


def fails(ws: Workspace, argv: list[str], code: int, line: str, stdin: bytes = b"") -> str:
    """Run `ctxdiff argv`: it exits `code`, its stderr ends with one line matching `line` (a
    regex), no traceback, and no file that was there changed."""
    outcome = ws.run(argv, stdin)
    assert not outcome.problems(), outcome.describe()
    last = outcome.err.strip().splitlines()[-1]
    assert outcome.code == code and last.startswith("error: ") and re.search(line, last), outcome.describe()
    return last


def tiny(ws: Workspace) -> list[str]:
    return ["-m", ws.asset("tiny.safetensors")]


VIDEO_ARGS = ["--frames", "4", "--stride", "1"]


# -- output paths that cannot be written: exit 2 before any work, in every subcommand --------------

UNUSABLE = {"proc": ("/proc/ctxdiff-out", r"cannot write in /proc"),
            "under a file": ("scratch/afile/sub", r"cannot be created: .*afile is a file, not a folder")}


@pytest.mark.parametrize("where", sorted(UNUSABLE))
@pytest.mark.parametrize("command", ["generate", "shapes", "train", "tune-video", "invert", "edit", "evaluate"])
def test_an_output_path_that_cannot_be_written_is_a_usage_error_before_any_work(ws, command, where):
    path, line = UNUSABLE[where]
    out = path if path.startswith("/") else str(ws.root / path)
    argv = {
        "generate": ["generate", "a red circle", *tiny(ws), "--out", out],
        "shapes": ["shapes", out, "--n", "1"],
        "train": ["train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={out}"],
        "tune-video": ["tune-video", ws.asset("video"), *tiny(ws), *VIDEO_ARGS, "--out", out],
        "invert": ["invert", ws.asset("video"), *tiny(ws), *VIDEO_ARGS, "--out", out + ".safetensors"],
        "edit": ["edit", ws.asset("video"), "--tgt", "a blue circle", *tiny(ws), *VIDEO_ARGS, "--out", out + ".mp4"],
        "evaluate": ["evaluate", "--metric", "shapes", "--images", ws.asset("real"), "--out", out + ".json"],
    }[command]
    fails(ws, argv, 2, line)


@pytest.mark.parametrize("command", ["generate", "shapes", "train", "tune-video"])
def test_an_output_folder_that_is_a_file_is_exit_2_in_every_subcommand(ws, command):
    afile = ws.scratch("afile")
    argv = {"generate": ["generate", "a red circle", *tiny(ws), "--out", afile],
            "shapes": ["shapes", afile, "--n", "1"],
            "train": ["train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={afile}"],
            "tune-video": ["tune-video", ws.asset("video"), *tiny(ws), *VIDEO_ARGS, "--out", afile]}[command]
    fails(ws, argv, 2, r"afile: exists and is not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder without write permission")
def test_a_folder_without_write_permission_is_a_usage_error(ws):
    fails(ws, ["generate", "a red circle", *tiny(ws), "--out", ws.scratch("ro/new")], 2, r"cannot write in .*ro")


def test_an_unsupported_video_suffix_is_a_usage_error_before_editing(ws):
    fails(ws, ["edit", ws.asset("video"), "--tgt", "a blue circle", *tiny(ws), *VIDEO_ARGS,
               "--out", ws.scratch("edit.avi")], 2, r"cannot write '\.avi' videos; write one of: \.mp4, \.webm, \.gif")


# -- text that is not UTF-8 ---------------------------------------------------------------------------

def test_a_prompt_on_stdin_that_is_not_utf8_names_stdin_line_and_column(ws):
    fails(ws, ["generate", "-", *tiny(ws), "--out", ws.scratch("new")], 1,
          r"stdin, line 1, column 3: the prompt input is not UTF-8 text \(byte 0xff\); save it as UTF-8",
          stdin=b"a \xff\xfe\n")


def test_a_prompt_on_stdin_from_a_real_pipe_is_read_as_utf8(tmp_path):
    """The same through a real pipe (sys.stdin.buffer), in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "ctxdiff", "generate", "-", "--out", str(tmp_path / "o")],
                            input=b"a red circle\nun cercle \xe9t\xe9\n", capture_output=True, env=env, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: stdin, line 2, column 11: the prompt input is not UTF-8 text "
                                            "(byte 0xe9); save it as UTF-8")


def test_a_prompt_file_that_is_not_utf8_names_the_file_line_and_column(ws):
    fails(ws, ["generate", "--from-file", ws.asset("latin1.txt"), *tiny(ws), "--out", ws.scratch("new")], 1,
          r"latin1\.txt, line 1, column 17: the prompts file is not UTF-8 text \(byte 0xe9\)")


# -- model files -------------------------------------------------------------------------------------

def test_a_bundle_with_damaged_metadata_is_one_line_naming_the_file(ws):
    fails(ws, ["generate", "a red circle", "-m", ws.asset("damaged.safetensors"), "--out", ws.scratch("new")], 1,
          r"damaged\.safetensors: not a usable t2i bundle")


def test_a_missing_model_file_says_it_is_missing_not_that_it_is_a_t2i_bundle(ws):
    last = fails(ws, ["generate", "a red circle", "-m", ws.scratch("missing.safetensors"), "--height", "16"], 1,
                 r"missing\.safetensors: no such model file or folder")
    assert "t2i bundle" not in last.split(";")[0]


def test_a_corrupt_config_inside_a_model_file_does_not_say_pass_set(ws, tmp_path):
    import safetensors
    import safetensors.torch

    tuned = ws.asset("tuned.safetensors")
    with safetensors.safe_open(tuned, "pt") as f:
        metadata = dict(f.metadata())
    configs = json.loads(metadata["configs"])
    configs["inflate"] = {"bogus": 1}
    bad = tmp_path / "tuned-bad.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(tuned), str(bad),
                                metadata={**metadata, "configs": json.dumps(configs)})
    last = fails(ws, ["invert", ws.asset("video"), "--tuned", str(bad), *tiny(ws), "--out", ws.scratch("new.safetensors")],
                 1, r"tuned-bad\.safetensors: a config inside the file does not read \(inflate\.bogus: unknown key")
    assert "--set" not in last and "recipe" not in last


def test_an_inversion_file_whose_records_do_not_read_is_a_damaged_file(ws):
    fails(ws, ["edit", ws.asset("video"), "--tgt", "a blue circle", "--inversion", ws.asset("tiny.safetensors"),
               *tiny(ws), "--out", ws.scratch("new.mp4")], 1, r"is a 't2i' bundle, expected 'video-inversion'")


# -- devices, seeds, numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("device,line", [
    ("meta", r"--device 'meta': not a device ctxdiff runs on; use auto, cpu, cuda or cuda:N"),
    ("xla", r"--device 'xla': not a device ctxdiff runs on"),
    ("mps", r"--device mps: no Apple GPU \(MPS\) is available here; use --device cpu"),
    ("cuda:99", r"--device cuda:99: (no CUDA device is available here|there is no such GPU here)"),
])
@pytest.mark.parametrize("command", ["generate", "invert", "evaluate"])
def test_a_device_that_is_not_here_is_a_usage_error(ws, device, line, command):
    if device == "mps":
        import torch

        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            pytest.skip("this machine has MPS")
    argv = {"generate": ["generate", "a red circle", *tiny(ws), "--out", ws.scratch("new")],
            "invert": ["invert", ws.asset("video"), *tiny(ws), *VIDEO_ARGS, "--out", ws.scratch("new.safetensors")],
            "evaluate": ["evaluate", "--metric", "bpd", "--model", ws.asset("tiny.safetensors"), "--data", "shapes",
                         "-n", "1"]}[command]
    fails(ws, ["--device", device, *argv], 2, line)


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**70)])
@pytest.mark.parametrize("command", ["generate", "shapes", "tune-video", "evaluate"])
def test_a_seed_outside_0_to_2_64_is_refused_in_every_subcommand(ws, command, seed):
    argv = {"generate": ["generate", "a red circle", *tiny(ws), "--out", ws.scratch("new")],
            "shapes": ["shapes", ws.scratch("new"), "--n", "1"],
            "tune-video": ["tune-video", ws.asset("video"), *tiny(ws), *VIDEO_ARGS, "--out", ws.scratch("new")],
            "evaluate": ["evaluate", "--metric", "shapes", "--images", ws.asset("real")]}[command]
    fails(ws, [*argv, "--seed", seed], 2, rf"Invalid value for '--seed': seeds are 0 \.\. 2\*\*64-1 "
                                          rf"\(18446744073709551615\), not {seed}")


def test_image_seeds_wrap_past_2_64_and_are_recorded(ws):
    outcome = ws.run(["--json", "-q", "generate", "a red circle", *tiny(ws), "--steps", "1", "-n", "2",
                      "--seed", str(2**64 - 1), "--out", ws.scratch("new")])
    assert outcome.code == 0, outcome.describe()
    assert [json.loads(line)["seed"] for line in outcome.out.splitlines()] == [2**64 - 1, 0]


def test_a_random_seed_is_recorded(ws):
    outcome = ws.run(["--json", "generate", "a red circle", *tiny(ws), "--steps", "1", "--out", ws.scratch("new")])
    (record,) = [json.loads(line) for line in outcome.out.splitlines()]
    assert outcome.code == 0 and 0 <= record["seed"] < 2**64
    assert f"seed {record['seed']} (random)" in outcome.err


@pytest.mark.parametrize("argv,line", [
    (["invert", "{video}", "{tiny}", *VIDEO_ARGS, "--steps", "100000", "--out", "{new}.safetensors"],
     r"--steps 100000: more than the model's 100 diffusion steps; pass at most 100"),
    (["edit", "{video}", "--tgt", "a blue circle", "{tiny}", *VIDEO_ARGS, "--steps", "1000", "--out", "{new}.mp4"],
     r"--steps 1000: more than the model's 100 diffusion steps"),
    (["generate", "a red circle", "{tiny}", "--steps", "1000", "--out", "{new}"],
     r"--steps 1000: more than the model's 100 diffusion steps"),
    (["evaluate", "--metric", "bpd", "--model", "{tiny_path}", "--data", "shapes", "-n", "1",
      "--bpd-timesteps", "100000"], r"--bpd-timesteps 100000: more than the model's 100 diffusion steps"),
    (["generate", "a red circle", "{tiny}", "--guidance", "inf", "--out", "{new}"],
     r"Invalid value for '--guidance' / '-g': must be a finite number, not inf"),
    (["edit", "{video}", "--tgt", "a blue circle", "{tiny}", "--guidance", "inf", "--out", "{new}.mp4"],
     r"Invalid value for '--guidance' / '-g': must be a finite number, not inf"),
    (["tune-video", "{video}", "{tiny}", *VIDEO_ARGS, "--set", "lr=.nan", "--out", "{new}"],
     r"lr must be a finite number, got nan"),
    (["tune-video", "{video}", "{tiny}", *VIDEO_ARGS, "--lr", "inf", "--out", "{new}"],
     r"Invalid value for '--lr': must be a finite number, not inf"),
    (["train", "--recipe", "{recipe}", "--set", "train.lr=.inf"], r"train\.lr must be a finite number, got inf"),
    (["train", "--recipe", "{recipe}", "--set", "sample.steps=1000"],
     r"sample\.steps is 1000, more than diffusion\.timesteps 100"),
    (["generate", "a red circle", "-m", "{sd}", "--height", "9"], r"--height': 9 is not a multiple of 8"),
], ids=lambda value: " ".join(value[:1]) if isinstance(value, list) else None)
def test_numbers_are_checked_against_the_model_before_any_work(ws, argv, line):
    fill = {"{video}": ws.asset("video"), "{tiny_path}": ws.asset("tiny.safetensors"), "{recipe}": ws.asset("recipe.yaml"),
            "{sd}": ws.asset("tiny-sd.safetensors")}
    expanded = []
    for token in argv:
        if token == "{tiny}":
            expanded += tiny(ws)
        else:
            expanded.append(fill.get(token, token.replace("{new}", ws.scratch("new"))))
    fails(ws, expanded, 2, line)


# -- files are never lost -------------------------------------------------------------------------------

def test_train_never_writes_over_a_users_files_and_a_refused_force_deletes_nothing(ws, tmp_path):
    user = ws.scratch("userrun")          # a user's recipe.yaml, model.safetensors, metrics.jsonl; no checkpoints
    fails(ws, ["train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={user}"], 2,
          r"the folder holds files this run did not write")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "model.safetensors").write_text("mine")
    (mixed / "notes.txt").write_text("mine too")
    fails(ws, ["train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={mixed}", "--force"], 2,
          r"the folder holds files no run writes \(notes\.txt\); --force replaces only a run's files")
    assert (mixed / "model.safetensors").read_text() == "mine" and (mixed / "notes.txt").read_text() == "mine too"


def test_train_force_starts_a_run_over_and_replaces_its_log_instead_of_appending(ws):
    run = Path(ws.scratch("oldrun"))
    fails(ws, ["train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={run}"], 2,
          r"already holds a run \(checkpoint step-00000001\.pt\); pass --resume to continue it, --force to start it over")
    fails(ws, ["train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={run}", "--force", "--resume"], 2,
          r"--force starts the run over and --resume continues it; pass one of them")
    outcome = ws.run(["-q", "train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={run}", "--force"])
    assert outcome.code == 0, outcome.describe()


def test_train_force_leaves_one_runs_log(ws, tmp_path):
    """What --force leaves: the new run's log alone (replace, never append)."""
    from ctxdiff.cli import main

    run = tmp_path / "run"
    args = ["-q", "train", "--recipe", ws.asset("recipe.yaml"), "--set", f"output={run}"]
    assert main(args) == 0
    assert main([*args, "--force"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_tune_video_never_replaces_a_tuned_file_without_force(ws):
    run = ws.asset("tunerun")
    fails(ws, ["tune-video", ws.asset("video"), *tiny(ws), *VIDEO_ARGS, "--steps", "1", "--out", run], 2,
          r"already holds a run")


@pytest.mark.parametrize("flag,existing", [("--out", "keep.json"), ("--save-stats", "keep.npz")])
def test_evaluate_refuses_to_replace_a_file_without_force(ws, flag, existing):
    argv = ["evaluate", "--metric", "fid", "--real", ws.asset("real"),
            "--features", f"clip:tiny-clip:{ws.asset('tiny.safetensors')}", flag, ws.scratch(existing)]
    if flag == "--out":
        argv += ["--fake", ws.asset("real")]
    fails(ws, argv, 2, rf"{flag} .*{existing}: already exists; choose another {flag}, or pass --force to replace it")
    outcome = ws.run([*argv, "--force"])
    assert outcome.code == 0, outcome.describe()


# -- silent nonsense and misleading messages ---------------------------------------------------------------

def test_edit_with_an_inversion_of_another_length_is_refused(ws):
    fails(ws, ["edit", ws.asset("video"), "--tgt", "a blue circle moving to the right", *tiny(ws),
               "--inversion", ws.asset("inv.safetensors"), "--frames", "8", "--out", ws.scratch("new.mp4")], 2,
          r"--frames 8: .*inv\.safetensors inverts 4 frames; drop --frames, or invert again with --frames 8")


@pytest.mark.parametrize("tgt,extra,flag", [("", [], "--tgt"), ("  ", [], "--tgt"), ("a blue circle", ["--src", ""], "--src")])
def test_edit_refuses_an_empty_prompt(ws, tgt, extra, flag):
    fails(ws, ["edit", ws.asset("video"), "--tgt", tgt, *extra, *tiny(ws), "--out", ws.scratch("new.mp4")], 2,
          rf"{flag} is empty")


def test_a_wrong_kind_adapter_flag_is_the_same_exit_in_generate_and_tune_video(ws):
    """--adapter with a t2i bundle is a usage mistake (2) in both; an --adapter file of the wrong
    kind is a problem with the file (1) in both."""
    adapter = ["--adapter", ws.asset("plain.safetensors")]
    usage = r"--adapter: only for Stable Diffusion checkpoints; .*tiny\.safetensors is a ctxdiff t2i bundle"
    fails(ws, ["generate", "a red circle", *tiny(ws), *adapter, "--out", ws.scratch("new")], 2, usage)
    fails(ws, ["tune-video", ws.asset("video"), *tiny(ws), *adapter, *VIDEO_ARGS, "--out", ws.scratch("new")], 2, usage)
    sd = ["-m", ws.asset("tiny-sd.safetensors")]
    kind = r"plain\.safetensors: is a 't2i' bundle, not a latent adapter"
    fails(ws, ["generate", "a red circle", *sd, *adapter, "--out", ws.scratch("new")], 1, kind)
    fails(ws, ["tune-video", ws.asset("video"), *sd, *adapter, *VIDEO_ARGS, "--out", ws.scratch("new")], 1, kind)


def test_click_usage_errors_are_one_line_too(ws):
    fails(ws, ["generate", "--no-such-flag"], 2, r"No such option: --no-such-flag .*see 'ctxdiff generate --help'")
    fails(ws, ["shapes"], 2, r"Missing argument 'out_dir'")


def test_a_prompt_holding_rich_markup_is_printed_as_it_is(ws):
    outcome = ws.run(["generate", "a red [/] circle [bold]", *tiny(ws), "--steps", "1", "--out", ws.scratch("new")])
    assert outcome.code == 0 and "a red [/] circle [bold]" in outcome.err, outcome.describe()


# -- recipes and data the library refuses, as the command line shows them -------------------------------

def test_a_recipe_that_gives_a_key_twice_is_refused(ws, tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(Path(ws.asset("recipe.yaml")).read_text() + "train:\n  batch_size: 64\n")
    fails(ws, ["train", "--recipe", str(recipe)], 2, r"duplicate key 'train' \(first on line \d+\); keep one")


def test_a_recipe_whose_networks_embed_another_t_is_refused_before_training(ws):
    fails(ws, ["train", "--recipe", ws.asset("recipe.yaml"), "--set", "diffusion.timesteps=200"], 2,
          r"model\.unet\.timesteps is 100 but diffusion\.timesteps is 200")


def test_the_zero_shot_protocol_refuses_a_fake_folder_holding_images_it_did_not_make(ws):
    fails(ws, ["evaluate", "--metric", "fid", "--real", ws.asset("stats.npz"), "--fake", ws.asset("real"),
               "--model", ws.asset("tiny.safetensors"), "--prompts", ws.asset("prompts.txt"), "-n", "1", "--steps", "1",
               "--features", f"clip:tiny-clip:{ws.asset('tiny.safetensors')}"], 1, r"which this run did not make")
