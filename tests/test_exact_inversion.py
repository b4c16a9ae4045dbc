"""Exact inversion (docs/math.md#exact-inversion): context-aware EDICT undoes itself for any denoiser
and adapter, reduces to Wallace et al.'s EDICT with r = 0 and to Eq. 11 when its chains agree, and
the video pipeline's reconstruction through it returns the source clip."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ctxdiff.data.video import Video
from ctxdiff.diffusion.process import ddim_step
from ctxdiff.diffusion.samplers import (edict_invert_step, edict_step, highest_invertible_step, invert_edict,
                                        inversion_timesteps, sample_edict)
from ctxdiff.diffusion.schedule import make_schedule
from ctxdiff.formats.inversion import InversionParams, load_inversion, save_inversion
from ctxdiff.pipelines.video_edit import invert_video, reconstruct, sample_back
from ctxdiff.shapes.world import moving_shape_video
from tiny_video import tiny_video_model

T = 1000
SRC = "a red circle moving to the right"


@pytest.fixture(scope="module")
def sched():
    return make_schedule("cosine", T)


def toy_model(dim: int = 6, seed: int = 0):
    """A fixed non-linear x0 predictor and adapter (float64): any weights will do for exactness."""
    g = torch.Generator().manual_seed(seed)
    w, v = torch.randn(dim, dim, generator=g, dtype=torch.float64) / 2, torch.randn(dim, generator=g, dtype=torch.float64)

    def x0_fn(x, cond, t):
        return torch.tanh(x @ w + t.to(x.dtype)[:, None] / T)

    def adapter(x0, cond, t):
        return torch.sin(2 * x0 + v + t.to(x0.dtype)[:, None] / 300)

    return x0_fn, adapter


def test_edict_round_trip_is_exact_for_any_denoiser_and_adapter(sched):
    x0_fn, adapter = toy_model()
    x_0 = torch.rand(5, 6, dtype=torch.float64) * 2 - 1
    steps = [0, *inversion_timesteps(T, 20, "trailing", highest_invertible_step(sched))]
    pairs = invert_edict(x0_fn, x_0, steps, sched, adapter=adapter)
    x_back, y_back = sample_edict(x0_fn, pairs[-1], steps[::-1], sched, adapter=adapter)
    assert (x_back - x_0).abs().max() < 1e-10 and (y_back - x_0).abs().max() < 1e-10
    for s, t in [(0, 50), (400, 450), (900, 979)]:   # one step each way, from any pair
        x, y = torch.randn(2, 5, 6, dtype=torch.float64)
        back = edict_step(sched, x0_fn, *edict_invert_step(sched, x0_fn, x, y, s, t, adapter), t, s, adapter)
        assert torch.allclose(back[0], x, atol=1e-10) and torch.allclose(back[1], y, atol=1e-10)


def test_edict_without_adapter_is_wallace_et_al_edict(sched):
    """r = 0: the EDICT step of Wallace et al. 2023 written on an epsilon network, step for step."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64) / 2
    abar = sched.alpha_bar

    def eps_net(x, t):
        return torch.tanh(x @ w) + t / T

    def x0_fn(x, cond, t):   # the same network read as an x0 predictor
        a = abar[t].reshape(-1, 1)
        return (x - (1 - a).sqrt() * eps_net(x, int(t[0]))) / a.sqrt()

    p = 0.93
    x, y = torch.randn(2, 4, 6, dtype=torch.float64)
    for t, s in [(979, 930), (300, 250), (50, 0)]:
        a_t = (abar[s] / abar[t]).sqrt()
        b_t = (1 - abar[s]).sqrt() - (abar[s] * (1 - abar[t]) / abar[t]).sqrt()
        x_inter = a_t * x + b_t * eps_net(y, t)
        y_inter = a_t * y + b_t * eps_net(x_inter, t)
        x_ref = p * x_inter + (1 - p) * y_inter
        y_ref = p * y_inter + (1 - p) * x_ref
        ours = edict_step(sched, x0_fn, x, y, t, s, adapter=None, mix=p)
        assert torch.allclose(ours[0], x_ref, atol=1e-9) and torch.allclose(ours[1], y_ref, atol=1e-9)
        x, y = x_ref, y_ref


def test_edict_half_step_with_equal_chains_is_context_aware_ddim(sched):
    """With x = y the first half-step is Eq. 11, bias included: the adapter enters as in the forward process."""
    x0_fn, adapter = toy_model(seed=2)
    x = torch.randn(4, 6, dtype=torch.float64)
    for t, s in [(979, 930), (500, 450), (50, 0)]:
        x_inter = edict_step(sched, x0_fn, x, x, t, s, adapter, mix=1.0)[0]
        expected = ddim_step(sched, x, t, s, x0_fn(x, None, torch.full((4,), t)), adapter)
        assert torch.allclose(x_inter, expected, atol=1e-9)


def test_inversion_steps_stop_where_the_signal_is_kept(sched):
    top = highest_invertible_step(sched)
    assert sched.alpha_bar[top] >= 1e-3 > sched.alpha_bar[top + 1] and top < T
    assert inversion_timesteps(T, 20, "trailing") == list(range(50, 1001, 50))
    steps = inversion_timesteps(T, 20, "trailing", top)
    assert steps[-1] == top and len(steps) == 20 and steps == sorted(steps)
    assert inversion_timesteps(T, 19, "trailing", 950) == list(range(50, 951, 50))
    with pytest.raises(ValueError):
        inversion_timesteps(T, 20, "trailing", T + 1)


def test_a_tiny_video_model_reconstructs_its_clip_exactly_through_edict(tmp_path):
    """Invert and sample back through the pipeline (adapter on, inflated U-Net): the frames come back
    to 1e-4 in the model's units, and the inversion file keeps both chains."""
    model = tiny_video_model(tmp_path)
    assert model.adapter is not None
    clip = moving_shape_video("a red circle moving to the right", frames=4, size=16, seed=3)
    video = Video(clip.frames, 8.0, tmp_path / "clip")
    params = InversionParams(steps=10, method="edict", max_t=highest_invertible_step(model.sched))
    inversion = load_inversion(save_inversion(tmp_path / "inv.safetensors", invert_video(model, video, SRC, params)))
    assert inversion.partner is not None and inversion.timesteps[-1] == params.max_t
    frames = len(video)
    x0 = model.to_model(video.frames)
    x_back = reconstruct(model, inversion)
    assert x_back.psnr == float("inf") and x_back.latent_error < 1e-4
    x = sample_back(model, inversion, model.x0_fn(frames), model.encode(SRC, frames), model.adapter_fn(frames))
    assert (x - x0).abs().max() < 1e-4
    plain = reconstruct(model, invert_video(model, video, SRC, replace(params, method="ddim")))
    assert plain.psnr < 40 and np.isfinite(plain.psnr)   # plain DDIM inversion is not exact on this model


def test_an_edit_to_the_source_prompt_guided_away_from_it_returns_the_clip(tmp_path):
    """Negative-prompt inversion (Miyake et al. 2023) on EDICT: guiding away from the source prompt
    toward itself leaves the inversion's own predictions, and fusion takes each chain's own maps, so
    `edit --tgt SRC` with guidance 7.5 and fusion returns the clip; away from "" it does not."""
    from ctxdiff.pipelines.video_edit import EditParams, edit_video

    model = tiny_video_model(tmp_path)
    clip = moving_shape_video("a red circle moving to the right", frames=4, size=16, seed=5)
    video = Video(clip.frames, 8.0, tmp_path / "clip")
    inversion = invert_video(model, video, SRC, InversionParams(steps=6, method="edict", attention=True, max_t=90))
    assert {k.split(".")[1] for k in inversion.attention} == {"x", "y"}
    same = edit_video(model, inversion, SRC, EditParams(negative="source"))
    assert np.abs(same.frames.astype(int) - clip.frames).max() <= 1
    classic = edit_video(model, inversion, SRC, EditParams(negative="empty"))
    assert np.abs(classic.frames.astype(int) - clip.frames).mean() > 1
