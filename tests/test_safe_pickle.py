"""Lightning .ckpt pickles (issue 23): their known data-only classes load as inert stand-ins, the weights
are those written, and a payload hidden behind an allowed name is refused without ever running.

Lightning is not installed: the tests install fake modules under its names, whose classes run a shell
command if a loader ever creates, calls or fills them, so a loader that imported what a pickle names
would run them.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch
from tiny_sd import tiny_sd_models

from ctxdiff import safe_pickle
from ctxdiff.checkpoints import load_torch_file
from ctxdiff.errors import CtxdiffError
from ctxdiff.models.latent import load_sd
from ctxdiff.models.latent.convert import to_compvis

FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


@pytest.fixture(scope="module")
def sd_state() -> dict[str, torch.Tensor]:
    models = tiny_sd_models(0)
    return {k: v.clone().contiguous() for k, v in to_compvis(models.unet, models.vae, models.text).items()}


def _install(monkeypatch, module: str, **objects) -> None:
    """Make `module.name` importable for pickle (a fake module chain), as if Lightning were installed."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name, obj in objects.items():
        obj.__module__, obj.__qualname__ = module, name
        monkeypatch.setattr(sys.modules[module], name, obj, raising=False)


class _Reduce:
    """Pickles as `fn(*args)`: how a file makes the loader call something."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _shell_payload_class(marker):
    """A class that runs a shell command when it is created, called or given state."""
    class Payload:
        def __new__(cls, *args, **kwargs):
            os.system(f"touch {marker}")
            return super().__new__(cls)

        def __init__(self, *args):
            os.system(f"touch {marker}")

        def __setstate__(self, state):
            os.system(f"touch {marker}")
    return Payload


def _lightning_checkpoint(state, callback_class) -> dict:
    """As Lightning 1.4 writes it (the SD 1.4 release): callback state keyed by the callback class."""
    callback = {"monitor": None, "best_model_path": "logs/last.ckpt", "dirpath": "logs/checkpoints",
                "best_model_score": np.float64(0.125), "kth": np.array([1.0, 2.0])}
    return {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "callbacks": {callback_class: callback}, "optimizer_states": [], "lr_schedulers": []}


@FORMATS
def test_lightning_ckpt_loads_with_its_classes_replaced_by_inert_stand_ins(sd_state, tmp_path, monkeypatch,
                                                                           zip_format):
    marker = tmp_path / "ran"
    payload = _shell_payload_class(marker)
    _install(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=payload)
    checkpoint = _lightning_checkpoint(sd_state, payload)
    checkpoint["callbacks"]["built"] = _Reduce(payload, "argument")  # REDUCE on the allowed name
    checkpoint["callbacks"]["filled"] = object.__new__(payload)   # NEWOBJ + BUILD on it
    checkpoint["callbacks"]["filled"].__dict__["x"] = 1
    path = tmp_path / "sd-v1-4.ckpt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    assert not marker.exists()

    loaded = load_torch_file(path)
    callbacks = loaded["callbacks"]
    key = next(k for k in callbacks if isinstance(k, type))
    assert key is not payload and issubclass(key, safe_pickle.StandIn)
    assert key.name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert isinstance(callbacks[key]["best_model_score"], safe_pickle.StandIn)
    assert isinstance(callbacks["built"], safe_pickle.StandIn) and callbacks["built"].args == ("argument",)
    assert isinstance(callbacks["filled"], safe_pickle.StandIn) and callbacks["filled"].state == {"x": 1}
    assert loaded["state_dict"].keys() == sd_state.keys()
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in sd_state.items())
    ours = load_sd(path)
    assert not marker.exists()
    safetensors.torch.save_file(sd_state, str(tmp_path / "same.safetensors"))
    same = load_sd(tmp_path / "same.safetensors")
    for part in ("unet", "vae", "text"):
        a, b = getattr(ours, part).state_dict(), getattr(same, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_hyper_parameters_load_as_a_plain_dict(tmp_path, monkeypatch):
    class AttributeDict(dict):
        pass
    _install(monkeypatch, "pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict)
    torch.save({"hyper_parameters": AttributeDict(lr=1e-4, size=512), "w": torch.ones(2)}, tmp_path / "h.ckpt")
    loaded = load_torch_file(tmp_path / "h.ckpt")
    assert type(loaded["hyper_parameters"]) is dict and loaded["hyper_parameters"] == {"lr": 1e-4, "size": 512}


@FORMATS
@pytest.mark.parametrize("hiding", ["allowed-looking name", "allowed class reducing to os.system",
                                    "payload in an allowed call's arguments", "payload in allowed state"])
def test_payload_behind_an_allowed_name_is_refused_and_never_runs(hiding, zip_format, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    command = _Reduce(os.system, f"touch {marker}")

    def run(*args):
        os.system(f"touch {marker}")

    class ModelCheckpoint:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    _install(monkeypatch, "pytorch_lightning.callbacks.evil", run=run)
    payload = _shell_payload_class(marker)
    _install(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=payload)
    bad = {"allowed-looking name": _Reduce(run),
           "allowed class reducing to os.system": ModelCheckpoint(),
           "payload in an allowed call's arguments": _Reduce(payload, command),
           "payload in allowed state": {payload: {"best_model_score": command}}}[hiding]
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callbacks": bad}, path, _use_new_zipfile_serialization=zip_format)
    assert not marker.exists()
    with pytest.raises(CtxdiffError, match=r"evil\.ckpt: refused: needs arbitrary code execution \(pickle\)") as info:
        load_sd(path)
    assert "\n" not in str(info.value) and ("posix.system" in str(info.value) or "evil.run" in str(info.value))
    assert not marker.exists()


def test_a_stand_in_takes_no_attributes_from_the_pickle():
    """BUILD stores the state in a slot: it cannot plant a __setstate__ (or anything) for a later BUILD."""
    stand_in = safe_pickle.ALLOWED["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]("a", 1)
    stand_in.__setstate__({"__setstate__": print})
    assert stand_in.args == ("a", 1) and stand_in.state == {"__setstate__": print}
    with pytest.raises(AttributeError):
        stand_in.__dict__
