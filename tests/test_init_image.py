"""img2img and inpainting inputs: strength, start steps, masks and their sizes, Eq. 1 at any network time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctxdiff.diffusion import make_schedule, q_sample
from ctxdiff.errors import UsageError
from ctxdiff.pipelines.init_image import (
    InitImage, InitImageResized, forward_at, inpainting, mask_for, read_init_image, start_step, start_timesteps,
)


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, float("nan"), float("inf")])
def test_strength_outside_zero_one_is_a_usage_error(strength):
    with pytest.raises(UsageError, match=r"strength must lie in \(0, 1\]"):
        InitImage(torch.zeros(1, 3, 8, 8), strength)
    with pytest.raises(UsageError, match="strength"):
        start_step(1000, strength)


def test_img2img_starts_at_round_s_t_and_keeps_the_grid_below():
    assert [start_step(1000, s) for s in (1.0, 0.5, 0.1, 1e-4)] == [1000, 500, 100, 1]
    grid = [1000, 800, 600, 400, 200, 0]
    assert start_timesteps(grid, 1000) == grid
    assert start_timesteps(grid, 500) == [500, 400, 200, 0]
    assert start_timesteps(grid, 400) == [400, 200, 0]


def test_a_mask_of_another_size_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="the mask is 4x4 but its init image 8x8"):
        InitImage(torch.zeros(1, 3, 8, 8), 0.5, torch.ones(1, 1, 4, 4))
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(UsageError, match=r"mask.png: the mask is 10x10 but init.png is 12x10"):
        read_init_image(tmp_path / "init.png", (8, 8), 0.5, tmp_path / "mask.png")


def test_init_images_of_another_size_are_resized_with_a_note(tmp_path):
    pixels = np.zeros((10, 12, 3), np.uint8)
    pixels[:, 6:] = 255
    Image.fromarray(pixels).save(tmp_path / "init.png")
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    init, notes = read_init_image(tmp_path / "init.png", (8, 16), 0.3, tmp_path / "mask.png")
    assert init.images.shape == (1, 3, 8, 16) and init.mask.shape == (1, 1, 8, 16) and init.strength == 0.3
    assert notes == [f"{tmp_path / 'init.png'}: 12x10 resized to the model's 16x8 (its mask too)"]
    assert init.mask[..., :8].max() == 0 and init.mask[..., 8:].min() == 1     # white = repaint, binarised
    assert init.images.min() >= -1 and init.images.max() <= 1
    same, none = read_init_image(tmp_path / "init.png", (10, 12), 1.0)
    assert none == [] and same.mask is None
    with pytest.warns(InitImageResized, match="resized"):
        InitImage(torch.zeros(1, 3, 8, 8)).resized((16, 16))


def test_a_coarser_mask_repaints_every_cell_that_holds_a_repainted_pixel():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, 5] = 1
    coarse = mask_for(mask, (4, 4))
    assert coarse.sum() == 1 and coarse[0, 0, 1, 2] == 1


def test_forward_process_at_integer_steps_is_eq1_and_between_steps_interpolates():
    sched = make_schedule("scaled_linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    adapter = lambda x, cond, t: torch.tanh(x) * (t.float().view(-1, 1, 1, 1) / 1000)  # noqa: E731
    t = torch.tensor([300, 700])
    assert torch.equal(forward_at(sched, x0, t, adapter, None, noise), q_sample(sched, x0, t, adapter, None, noise))
    lo, mid, hi = (forward_at(sched, x0, v, None, None, noise) for v in (torch.tensor([300.0] * 2),
                                                                          torch.tensor([300.5] * 2), torch.tensor([301] * 2)))
    assert torch.all((mid - lo) * (hi - mid) >= -1e-12)                            # between its neighbours


def test_inpainting_keeps_the_known_region_on_eq1_and_its_prediction_on_the_init():
    sched = make_schedule("scaled_linear", 1000)
    x0_init, noise, x = torch.ones(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    seen = []
    x0_fn = inpainting(lambda x_t, c, t: seen.append(x_t) or torch.zeros_like(x_t), sched, x0_init, mask, noise)
    out = x0_fn(x, None, torch.tensor([400]))
    known = q_sample(sched, x0_init, 400, noise=noise)
    assert torch.equal(seen[0][..., 2:], known[..., 2:]) and torch.equal(seen[0][..., :2], x[..., :2])
    assert torch.equal(out[..., 2:], x0_init[..., 2:]) and out[..., :2].abs().max() == 0


def test_a_prompts_file_line_carries_its_own_negative_prompt():
    from ctxdiff.data.images import split_negative
    assert split_negative("a cat in armor --negative blurry, low quality") == ("a cat in armor", "blurry, low quality")
    assert split_negative("a cat in armor", default="ugly") == ("a cat in armor", "ugly")
    assert split_negative("a cat --negative ", default="ugly") == ("a cat", "")       # an explicit empty negative
    assert split_negative("a cat --negative", default="ugly") == ("a cat", "")
    assert split_negative("a cat--negative x") == ("a cat--negative x", "")
