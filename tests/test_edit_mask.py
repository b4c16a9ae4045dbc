"""Where an edit may change the clip (DiffEdit's and the attention's blend masks) and local blending:
the source's inverted state outside the mask (pipelines/edit_mask.py)."""

import numpy as np
import pytest
import torch

from tiny_video import SRC, tiny_video_model

from ctxdiff.data.video import Video
from ctxdiff.diffusion import make_schedule
from ctxdiff.formats.inversion import InversionParams
from ctxdiff.pipelines.attention_control import blend_mask, map_key
from ctxdiff.pipelines.edit_mask import SourceKeeper, at_grid, diffedit_map, dilate, sample_kept, threshold_map
from ctxdiff.pipelines.video_edit import EditParams, edit_video, invert_video, sample_back, source_states
from ctxdiff.shapes.world import moving_shape_video

TGT = "a blue circle moving to the right"


def region(frames: int, side: int) -> torch.Tensor:
    """A different square in each frame: rows 2..5, columns 1+f..4+f."""
    r = torch.zeros((frames, side, side), dtype=torch.bool)
    for f in range(frames):
        r[f, 2:6, 1 + f:5 + f] = True
    return r


def denoiser_that_reads_the_prompt_inside(r: torch.Tensor):
    """x0_hat = 0.4 x_t + c * R: the prompt c (one number per frame) matters only inside R."""
    def x0_fn(x, cond, t):
        return 0.4 * x + cond[:, None, None, None] * r[:, None].to(x.dtype)
    return x0_fn


@pytest.mark.parametrize("adapter", [None, lambda x0, cond, t: 0.3 * x0.flip(-1)])
def test_diffedit_mask_of_prompts_that_differ_only_in_a_region_is_that_region(adapter):
    frames, side = 3, 12
    r = region(frames, side)
    sched = make_schedule("cosine", 100)
    x0 = torch.rand((frames, 3, side, side)) * 2 - 1
    src, tgt = torch.full((frames,), -0.5), torch.full((frames,), 0.5)
    scaled = diffedit_map(denoiser_that_reads_the_prompt_inside(r), x0, src, tgt, sched, adapter=adapter)
    assert scaled.shape == (frames, side, side) and float(scaled.max()) == pytest.approx(1.0)
    if adapter is None:   # eps_tgt - eps_src = -sqrt(abar / (1 - abar)) (c_tgt - c_src) R: exactly R
        assert torch.equal(threshold_map(scaled, 0.5, grow=0), r)
    else:                 # the bias of a prediction moves with it (here mirrored): inside R or its mirror
        assert not (threshold_map(scaled, 0.5, grow=0) & ~(r | r.flip(-1))).any()
    assert torch.equal(threshold_map(scaled, 0.5, grow=1) & ~dilate(r), torch.zeros_like(r))


def test_prompts_whose_predictions_agree_give_an_empty_mask():
    r = region(2, 8)
    same = torch.full((2,), 0.3)
    scaled = diffedit_map(denoiser_that_reads_the_prompt_inside(r), torch.zeros((2, 3, 8, 8)), same, same.clone(),
                          make_schedule("cosine", 100))
    assert not scaled.any() and not threshold_map(scaled, 0.2).any()


def test_span_scaling_ignores_the_attention_every_cell_gets():
    frames, side = 1, 4
    probs = torch.full((frames, 1, side * side, 6), 0.01)
    probs[0, 0, :, 3] = 0.5                               # a floor: every cell attends to the word at half the peak
    probs[0, 0, 5, 3] = 1.0
    maps = {map_key(10, "mid", "cross"): probs.half()}
    cpu = torch.device("cpu")
    assert blend_mask(maps, (3,), 0.3, cpu).all()         # FateZero's max-scaling keeps every cell
    assert blend_mask(maps, (3,), 0.3, cpu, span=True)[0].flatten().nonzero().flatten().tolist() == [5]


def test_a_small_region_survives_a_coarser_grid_and_grows_back_by_nearest_cells():
    mask = torch.zeros((1, 8, 8), dtype=torch.bool)
    mask[0, 5, 2] = True
    coarse = at_grid(mask, 4)
    assert coarse[0].nonzero().tolist() == [[2, 1]]
    assert at_grid(coarse, 8)[0].nonzero().tolist() == [[4, 2], [4, 3], [5, 2], [5, 3]]
    assert dilate(mask)[0].sum() == 9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mask")
    model = tiny_video_model(folder)
    clip = moving_shape_video(SRC, frames=4, size=16, seed=9102)
    return model, Video(clip.frames, 8.0, folder / "clip")


@pytest.mark.parametrize("method", ["edict", "ddim"])
def test_outside_the_mask_the_blended_edit_is_the_source(tiny, method):
    model, video = tiny
    inversion = invert_video(model, video, SRC, InversionParams(steps=3, method=method, attention=True))
    edit = edit_video(model, inversion, TGT, EditParams(mask_from="diffedit", keep_source=True, blend_threshold=0.7))
    outside = ~edit.edited_region
    assert outside.any() and edit.edited_region.any()
    diff = np.abs(edit.frames.astype(np.float64) - inversion.frames) / 255
    assert diff[outside].max() < 1e-4


def test_the_target_prompt_equal_to_the_source_keeps_every_pixel(tiny):
    model, video = tiny
    inversion = invert_video(model, video, SRC, InversionParams(steps=3, attention=True))
    for mask_from in ("diffedit", "attention-span"):
        same = edit_video(model, inversion, SRC, EditParams(mask_from=mask_from, keep_source=True))
        assert not same.edited_region.any() and np.array_equal(same.frames, inversion.frames)


@pytest.mark.parametrize("method", ["edict", "ddim"])
def test_a_mask_over_everything_changes_nothing_and_one_over_nothing_returns_the_source(tiny, method):
    model, video = tiny
    inversion = invert_video(model, video, SRC, InversionParams(steps=3, method=method))
    frames = len(video)
    x0_fn, cond, adapter = model.x0_fn(frames), model.encode(TGT, frames), model.adapter_fn(frames)
    plain = sample_back(model, inversion, x0_fn, cond, adapter)
    states = source_states(model, inversion)
    everything = torch.ones((frames, 16, 16), dtype=torch.bool)
    kept = sample_back(model, inversion, x0_fn, cond, adapter, keeper=SourceKeeper(states, everything))
    assert torch.allclose(kept.float(), plain.float(), atol=1e-6)
    none = sample_back(model, inversion, x0_fn, cond, adapter, keeper=SourceKeeper(states, ~everything))
    assert torch.allclose(none.float().cpu(), states[0], atol=1e-6)


def test_sampling_with_a_keeper_steps_like_the_plain_sampler_in_between():
    sched = make_schedule("cosine", 100)
    x_T = torch.randn((2, 3, 4, 4))
    seen = []
    keeper = SourceKeeper({s: torch.zeros_like(x_T) for s in (50, 0)}, torch.ones((2, 4, 4), dtype=torch.bool))
    keeper.keep = lambda x, s: (seen.append(s), x)[1]
    sample_kept(lambda x, c, t: 0.5 * x, x_T, [100, 50, 0], sched, keeper)
    assert seen == [50, 0]


def test_edit_params_refuse_an_unknown_mask_source():
    with pytest.raises(ValueError, match="mask_from"):
        EditParams(mask_from="sam")


def test_edit_cli_keeps_the_source_outside_a_diffedit_mask_and_refuses_a_mask_it_cannot_make(tmp_path, capsys):
    import json

    from PIL import Image

    from tiny_video import tiny_video_bundle

    from ctxdiff.cli import main

    model = tiny_video_bundle(tmp_path)
    image = tmp_path / "red.png"
    Image.fromarray(moving_shape_video(SRC, frames=2, size=16, seed=9103).frames[0]).save(image)
    common = ["edit", str(image), "--model", str(model), "--src", SRC, "--tgt", TGT, "--steps", "3"]
    assert main(["--json", *common, "--mask-from", "diffedit", "--keep-source", "--blend-threshold", "0.7",
                 "--out", str(tmp_path / "blue")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mask_from"] == "diffedit" and record["keep_source"] and 0 < record["blend_fraction"] < 1
    assert record["psnr_kept"] == float("inf")
    assert main([*common, "--keep-source", "--no-fusion", "--out", str(tmp_path / "x")]) == 2
    assert "--mask-from diffedit" in capsys.readouterr().err
