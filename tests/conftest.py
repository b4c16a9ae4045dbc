"""Shared fixtures: tiny recipes that train in seconds on a CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread, here and in the CLI subprocesses the tests start: results then do not depend on how
# many cores the machine has, and two OpenMP threads on a busy 2-core machine run ~10x slower.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_RECIPE = """
output: {output}
model:
  clip: {{arch: tiny-clip}}
  unet:
    image_size: 16
    base_channels: 16
    channel_mults: [1, 2]
    num_res_blocks: 1
    attention_levels: [1]
    heads: 2
    text_dim: 32
    pooled_dim: 32
    timesteps: 100
  adapter:
    x_shape: [3, 16, 16]
    patch_size: 4
    width: 32
    heads: 2
    blocks: 1
    text_dim: 32
    timesteps: 100
diffusion: {{schedule: cosine, timesteps: 100, cond_drop_prob: 0.2}}
data: {{source: shapes, image_size: 16, shapes_count: 40}}
train:
  steps: 6
  batch_size: 4
  lr: 0.001
  warmup_steps: 2
  ema_decay: 0.9
  checkpoint_every: 2
  keep_last: 2
  sample_every: 0
  log_every: 1
sample: {{steps: 4, sr_steps: 4, guidance: 2.0}}
preview_prompts: ["a red circle", "a blue square"]
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write the tiny recipe; returns a function (output folder name, extra YAML) -> recipe path."""
    def make(name: str = "run", extra: str = "") -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(TINY_RECIPE.format(output=tmp_path / name) + extra)
        return str(path)
    return make
