"""Two CPU processes under torchrun (gloo) compute the update of one process on the combined batch."""

import os
import subprocess
import sys

import torch

from ctxdiff.checkpoints import latest_checkpoint, load_training_state


def test_two_rank_torchrun_matches_single_process(tiny_recipe, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    overrides = ["--set", "train.steps=3", "--set", "train.checkpoint_every=3", "--set", "model.unet.dropout=0.0"]
    single = subprocess.run([sys.executable, "-m", "ctxdiff", "--quiet", "train", "--recipe", tiny_recipe("single"),
                             *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ctxdiff", "--quiet", "--device", "cpu", "train", "--recipe", tiny_recipe("ddp"),
                          *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_training_state(latest_checkpoint(tmp_path / "single" / "checkpoints"))["model"]
    b = load_training_state(latest_checkpoint(tmp_path / "ddp" / "checkpoints"))["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
