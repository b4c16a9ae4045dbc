from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import safetensors.torch
import torch

import ctxdiff
from ctxdiff import checkpoints
from ctxdiff.checkpoints import (
    capture_rng_state,
    latest_checkpoint,
    load_bundle,
    load_module_state,
    load_torch_file,
    load_training_state,
    read_state_dict,
    restore_rng_state,
    rotate_checkpoints,
    save_bundle,
    save_training_state,
    training_state_path,
)
from ctxdiff.errors import CtxdiffError


@dataclass(frozen=True)
class TinyConfig:
    width: int = 4
    mults: tuple[int, ...] = (1, 2)


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(3, width)
        self.norm = torch.nn.BatchNorm1d(width)  # an int64 buffer: num_batches_tracked
        self.head = torch.nn.Linear(width, 3, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def tiny(seed: int = 0, width: int = 4) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(width)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_bundle_round_trips_values_dtypes_configs_and_version(tmp_path):
    model = tiny()
    extra_state = {"scale": torch.tensor([2.0], dtype=torch.float64)}
    path = save_bundle(
        tmp_path / "m.safetensors",
        {"unet": model, "stats": extra_state},
        {"unet": TinyConfig(), "note": {"a": 1}},
        kind="t2i",
        extra={"steps": 12},
    )
    bundle = load_bundle(path, kind="t2i")
    assert bundle.kind == "t2i" and bundle.version == ctxdiff.__version__
    assert bundle.configs == {"unet": {"width": 4, "mults": [1, 2]}, "note": {"a": 1}}
    assert bundle.extra == {"steps": 12}
    assert_same_state(bundle.tensors["unet"], model.state_dict())
    assert_same_state(bundle.tensors["stats"], extra_state)
    assert bundle.tensors["unet"]["norm.num_batches_tracked"].dtype == torch.int64


def test_bundle_ships_floats_in_fp16_and_keeps_integer_buffers(tmp_path):
    model = tiny()
    bundle = load_bundle(save_bundle(tmp_path / "m.safetensors", {"unet": model}, {}, "t2i", dtype=torch.float16))
    weight = bundle.tensors["unet"]["lin.weight"]
    assert weight.dtype == torch.float16
    assert torch.equal(weight, model.lin.weight.detach().half())
    assert bundle.tensors["unet"]["norm.num_batches_tracked"].dtype == torch.int64


def test_bundle_saves_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "same": base, "t": base.t(), "view": base[1]}
    bundle = load_bundle(save_bundle(tmp_path / "m.safetensors", {"m": state}, {}, "t2i"))
    for key, value in state.items():
        assert torch.equal(bundle.tensors["m"][key], value)


def test_failed_save_leaves_old_bundle_intact_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_bundle(path, {"unet": tiny(0)}, {"v": 1}, "t2i")
    before = path.read_bytes()

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_bundle(path, {"unet": tiny(1)}, {"v": 2}, "t2i")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_interrupted_rename_leaves_no_file_at_target(tmp_path, monkeypatch):
    def no_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(CtxdiffError, match=r"cannot write .*m\.safetensors: No space left on device"):
        save_bundle(tmp_path / "m.safetensors", {"unet": tiny()}, {}, "t2i")
    assert list(tmp_path.iterdir()) == []


def test_truncated_bundle_is_reported_as_truncated_or_corrupt(tmp_path):
    path = save_bundle(tmp_path / "m.safetensors", {"unet": tiny()}, {}, "t2i")
    data = path.read_bytes()
    for cut in (4, 40, len(data) - 8):
        path.write_bytes(data[:cut])
        with pytest.raises(CtxdiffError, match=r"m\.safetensors: truncated or corrupt") as info:
            load_bundle(path)
        assert "\n" not in str(info.value)


def test_plain_safetensors_file_is_not_a_ctxdiff_bundle(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CtxdiffError, match=r"plain\.safetensors: not a ctxdiff model bundle.*`ctxdiff train`"):
        load_bundle(path)


def test_wrong_bundle_kind_is_refused(tmp_path):
    path = save_bundle(tmp_path / "clip.safetensors", {"clip": tiny()}, {}, "clip")
    with pytest.raises(CtxdiffError, match=r"is a 'clip' bundle, expected 't2i'"):
        load_bundle(path, kind="t2i")


def test_missing_bundle_names_the_path(tmp_path):
    with pytest.raises(CtxdiffError, match=r"nothere\.safetensors: no such file"):
        load_bundle(tmp_path / "nothere.safetensors")


def test_load_module_state_casts_to_module_dtype():
    source = tiny(0)
    target = tiny(1).double()
    load_module_state(target, {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}, "m")
    assert target.lin.weight.dtype == torch.float64
    assert torch.equal(target.lin.weight, source.lin.weight.detach().half().double())


def test_load_module_state_lists_missing_and_unexpected_names_with_counts():
    state = tiny().state_dict()
    del state["lin.weight"], state["head.weight"]
    state.update({f"extra.{i}": torch.zeros(1) for i in range(10)})
    with pytest.raises(CtxdiffError) as info:
        load_module_state(tiny(), state, "bundle: unet")
    message = str(info.value)
    assert message.startswith("bundle: unet: weights do not fit the model")
    assert "2 missing: head.weight, lin.weight" in message
    assert "10 unexpected: extra.0, extra.1" in message and "... and 2 more" in message
    assert "\n" not in message


def test_load_module_state_reports_shape_mismatch_even_when_not_strict():
    with pytest.raises(CtxdiffError, match=r"lin\.weight \(file \(8, 3\), model \(4, 3\)\)"):
        load_module_state(tiny(width=4), tiny(width=8).state_dict(), "m", strict=False)


def test_load_module_state_non_strict_returns_the_gaps():
    state = tiny().state_dict()
    del state["head.weight"]
    state["bogus"] = torch.zeros(1)
    assert load_module_state(tiny(), state, "m", strict=False) == (["head.weight"], ["bogus"])


class Custom:
    pass


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Custom(), "w": torch.ones(1)}, path)
    with pytest.raises(CtxdiffError, match=r"evil\.pt: refused: needs arbitrary code execution \(pickle\)"):
        read_state_dict(path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refused_pickle_never_runs_its_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": RunsCode(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(CtxdiffError, match="refused: needs arbitrary code execution"):
        load_training_state(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_corrupt_pickle_is_reported(tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CtxdiffError, match=r"bad\.ckpt: truncated or corrupt"):
        load_torch_file(path)
    good = save_training_state(tmp_path / "s.pt", {"w": torch.ones(100)})
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CtxdiffError, match=r"s\.pt: truncated or corrupt"):
        load_training_state(good)


def test_read_state_dict_dispatches_on_suffix_and_unwraps_state_dict(tmp_path):
    state = tiny().state_dict()
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "sd.ckpt")
    safetensors.torch.save_file(dict(state), str(tmp_path / "w.safetensors"))
    assert_same_state(read_state_dict(tmp_path / "sd.ckpt"), state)
    assert_same_state(read_state_dict(tmp_path / "w.safetensors"), state)
    (tmp_path / "w.onnx").write_bytes(b"")
    with pytest.raises(CtxdiffError, match=r"unsupported weights file type '\.onnx'"):
        read_state_dict(tmp_path / "w.onnx")


def draws():
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist(), np.random.randn()


def test_rng_restore_reproduces_random_sequences_after_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)
    path = save_training_state(tmp_path / "s.pt", {"rng": capture_rng_state(), "step": 5})
    expected = draws()
    assert draws() != expected
    state = load_training_state(path)
    restore_rng_state(state["rng"])
    assert draws() == expected
    assert state["step"] == 5


def test_training_state_round_trips_model_and_optimizer(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    path = save_training_state(training_state_path(tmp_path, 7), {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert path.name == "step-00000007.pt"
    state = load_training_state(path)
    assert_same_state(state["model"], model.state_dict())
    fresh = torch.optim.AdamW(tiny().parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rotation_keeps_newest_by_step_number_not_name(tmp_path):
    for step in (5, 100, 20, 3000, 7):
        save_training_state(tmp_path / f"step-{step}.pt", {"step": step})
    (tmp_path / "notes.txt").write_text("keep me")
    removed = rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-20.pt", "step-5.pt", "step-7.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-100.pt", "step-3000.pt"]
    assert latest_checkpoint(tmp_path).name == "step-3000.pt"


def test_latest_checkpoint_is_none_without_states(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None


def test_interrupted_training_state_save_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    save_training_state(training_state_path(tmp_path, 1), {"step": 1})
    monkeypatch.setattr(checkpoints.os, "replace", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_training_state(training_state_path(tmp_path, 2), {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    assert latest_checkpoint(tmp_path).name == "step-00000001.pt"
