"""Behaviour is pinned: the bundled model's PNG for a fixed prompt and seed is byte-identical to the
file recorded before the package was reorganised (issue 17), pixels and text chunks alike."""

import hashlib

import pytest

from ctxdiff.cli import main
from ctxdiff.formats.t2i import DEFAULT_MODEL

# sha256 of `ctxdiff generate "a red circle above a blue square" -m shapes-default.safetensors
# --seed 1234` run in the package's assets folder (the PNG records the model path as given).
GOLDEN_SHA256 = "efbb610d48f02d7df8bec5aad6056fd1b129560a010474d86c1f6bc8940636a1"


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
def test_bundled_model_png_is_byte_identical_to_the_recorded_one(tmp_path, monkeypatch):
    monkeypatch.chdir(DEFAULT_MODEL.parent)
    assert main(["--quiet", "generate", "a red circle above a blue square", "-m", DEFAULT_MODEL.name,
                 "--seed", "1234", "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert hashlib.sha256(png.read_bytes()).hexdigest() == GOLDEN_SHA256
