"""Video models: U-Net inflation (Tune-A-Video), the spatio-temporal adapter, attention storing/fusion."""

import copy
from dataclasses import replace

import pytest
import torch

from ctxdiff.models.adapter import ADAPTER_PRESETS, ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.inflate import InflateConfig, VideoUNet
from ctxdiff.models.temporal import causal_window_mask
from ctxdiff.models.unet import UNET_PRESETS, UNet
from ctxdiff.models.video_adapter import VideoAdapter
from ctxdiff.pipelines.attention_control import (AttentionEditor, AttentionRecorder, FusionPlan, align_tokens,
                                                 blend_mask, map_key)
from helpers import perturbed

FRAMES = 5


def unet_2d(**changes) -> UNet:
    torch.manual_seed(0)
    return perturbed(UNet(replace(UNET_PRESETS["tiny"], image_size=16, timesteps=100, **changes))).eval()


def condition(frames: int, dim: int = 32, tokens: int = 6) -> TextCondition:
    torch.manual_seed(2)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    mask[:, 4:] = False
    return TextCondition(torch.randn(1, tokens, dim), mask, torch.randn(1, dim)).repeat_interleave(frames)


def moving_video(frames: int = FRAMES, size: int = 16) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(frames, 3, size, size)


T = torch.full((FRAMES,), 40)


# -- inflation -----------------------------------------------------------------------------------

def test_inflated_unet_keeps_every_2d_weight_and_adds_only_temporal_layers():
    flat = unet_2d()
    state_2d = copy.deepcopy(flat.state_dict())
    video = VideoUNet(flat)
    state_video = video.unet.state_dict()
    assert set(state_2d) <= set(state_video)
    assert all(torch.equal(state_2d[k], state_video[k]) for k in state_2d)
    new = set(state_video) - set(state_2d)
    assert new and all(".temporal." in k for k in new)
    assert all(torch.count_nonzero(state_video[k]) == 0 for k in new if ".temporal.to_out." in k)
    assert video.sites == ["down.1.units.0.attn", "mid.0.attn", "up.0.units.0.attn", "up.0.units.1.attn"]


@torch.no_grad()
def test_inflated_unet_equals_the_2d_unet_frame_by_frame_on_a_static_video():
    flat = unet_2d()
    video = VideoUNet(copy.deepcopy(flat))
    still = moving_video(1).repeat(FRAMES, 1, 1, 1)
    cond = condition(FRAMES)
    torch.testing.assert_close(video(still, T, cond, FRAMES), flat(still, T, cond), atol=2e-5, rtol=0)


@torch.no_grad()
def test_sparse_causal_attention_lets_a_frame_see_only_earlier_frames():
    flat = unet_2d()
    video = VideoUNet(copy.deepcopy(flat))
    clip, cond = moving_video(), condition(FRAMES)
    base = video(clip, T, cond, FRAMES)
    torch.testing.assert_close(base[0], flat(clip, T, cond)[0], atol=2e-5, rtol=0)  # frame 0 sees itself
    assert (base[1:] - flat(clip, T, cond)[1:]).abs().max() > 1e-3                   # the others see frame 0
    changed = clip.clone()
    changed[3] += 1.0
    after = video(changed, T, cond, FRAMES)
    assert torch.equal(after[:3], base[:3])                      # causal: earlier frames unchanged
    assert (after[4] - base[4]).abs().max() > 1e-4                # frame 4 attends to frame 3


@torch.no_grad()
def test_trained_temporal_attention_mixes_all_frames():
    video = VideoUNet(unet_2d())
    perturbed(video, scale=0.0)
    for name, p in video.named_parameters():
        if ".temporal.to_out." in name:
            p.normal_(0, 0.1)
    clip, cond = moving_video(), condition(FRAMES)
    base = video(clip, T, cond, FRAMES)
    changed = clip.clone()
    changed[3] += 1.0
    assert (video(changed, T, cond, FRAMES)[0] - base[0]).abs().max() > 1e-4   # frame 0 now sees frame 3


@torch.no_grad()
def test_without_sparse_causal_attention_frames_are_independent_before_temporal_layers():
    flat = unet_2d()
    video = VideoUNet(copy.deepcopy(flat), InflateConfig(sparse_causal=False, temporal_attention=False))
    clip, cond = moving_video(), condition(FRAMES)
    torch.testing.assert_close(video(clip, T, cond, FRAMES), flat(clip, T, cond), atol=2e-5, rtol=0)


def test_tunable_state_holds_the_attention_queries_and_the_temporal_layers_only():
    video = VideoUNet(unet_2d())
    names = set(video.tunable_state())
    assert {n for n in names if n.endswith("self_attn.to_q.weight")} and {n for n in names if "cross_attn.to_q" in n}
    assert all(".to_q." in n or ".temporal." in n for n in names)
    assert not any(".to_kv." in n and ".temporal." not in n for n in names)


def test_a_batch_of_partial_videos_is_refused():
    video = VideoUNet(unet_2d())
    with pytest.raises(ValueError, match="whole videos"):
        video(moving_video(4), torch.full((4,), 3), condition(4), 3)


# -- the spatio-temporal adapter -----------------------------------------------------------------

def image_adapter(blocks: int = 1) -> ContextAdapter:
    torch.manual_seed(4)
    config = replace(ADAPTER_PRESETS["tiny"], x_shape=(3, 16, 16), patch_size=4, blocks=blocks, timesteps=100)
    return perturbed(ContextAdapter(config)).eval()


@torch.no_grad()
def test_a_new_video_adapter_equals_the_image_adapter_frame_by_frame():
    flat = image_adapter(blocks=2)
    video = VideoAdapter.from_image_adapter(flat)
    clip, cond = moving_video(), condition(FRAMES)
    assert torch.equal(video(clip, cond, T, FRAMES), flat(clip, cond, T))
    assert set(flat.state_dict()) == {k.removeprefix("image.") for k in video.state_dict() if k.startswith("image.")}


@torch.no_grad()
def test_adapter_temporal_attention_is_causal_over_a_three_frame_window():
    video = VideoAdapter.from_image_adapter(image_adapter(blocks=1), window=3).eval()
    for layer in video.temporal:
        layer.to_out.weight.normal_(0, 0.3)
    clip, cond = moving_video(7), condition(7)
    t = torch.full((7,), 40)
    base = video(clip, cond, t, 7)
    changed = clip.clone()
    changed[2] += 1.0
    moved = (video(changed, cond, t, 7) - base).flatten(1).abs().amax(1)
    assert moved[:2].max() == 0 and moved[5:].max() == 0    # frames 0-1 and 5-6 do not see frame 2
    assert moved[2:5].min() > 1e-4                          # frames 2, 3, 4 do
    assert causal_window_mask(4, 3).tolist() == [[True, False, False, False], [True, True, False, False],
                                                 [True, True, True, False], [False, True, True, True]]


# -- attention storing and fusion ----------------------------------------------------------------

def test_refine_alignment_maps_shared_words_and_marks_the_edited_ones():
    source = [49406, 320, 736, 7117, 49407]            # <start> a red circle <end>
    target = [49406, 320, 1746, 3638, 7117, 49407]     # <start> a big blue circle <end>
    refine = align_tokens(source, target, 8, "refine")
    assert refine.source_of[:7].tolist() == [0, 1, 2, 3, 4, 4, 5]
    assert refine.aligned[:7].tolist() == [1, 1, 1, 0, 0, 1, 1]
    assert refine.edited == (3,)                        # "red"
    replace_ = align_tokens(source, [49406, 320, 1746, 7117, 49407], 8, "replace")
    assert replace_.source_of.tolist() == list(range(8)) and replace_.edited == (3,)


def test_blend_mask_covers_where_the_edited_word_attends():
    frames, side = 2, 4
    probs = torch.full((frames, 1, side * side, 6), 0.01)
    probs[0, 0, :, 3] = 0.0
    probs[0, 0, 5, 3] = probs[0, 0, 6, 3] = 1.0          # frame 0: the word attends to pixels 5, 6
    probs[1, 0, 15, 3] = 1.0
    maps = {map_key(10, "mid", "cross"): probs.half()}
    mask = blend_mask(maps, (3,), 0.3, torch.device("cpu"))
    assert mask.shape == (frames, side, side)
    assert mask[0].flatten().nonzero().flatten().tolist() == [5, 6]
    assert mask[1].flatten().nonzero().flatten().tolist() == [15]
    assert blend_mask(maps, (), 0.3, torch.device("cpu")) is None


@torch.no_grad()
def test_replaying_the_maps_recorded_on_the_same_input_changes_nothing_and_other_maps_take_over():
    video = VideoUNet(unet_2d())
    clip, other, cond = moving_video(), moving_video() * 0.5 + 0.3, condition(FRAMES)
    recorder, recorded_other = AttentionRecorder(16), AttentionRecorder(16)
    recorder.t = recorded_other.t = 40
    with video.controlled(recorder):
        plain = video(clip, T, cond, FRAMES)
    with video.controlled(recorded_other):
        other_out = video(other, T, cond, FRAMES)
    assert {k.rsplit(".", 1)[-1] for k in recorder.maps} == {"self", "cross"}
    assert all(m.dtype == torch.float16 for m in recorder.maps.values())
    alignment = align_tokens([1, 2, 3], [1, 2, 3], cond.tokens.shape[1] + 1, "replace")
    plan = FusionPlan(self_replace=1.0, cross_replace=1.0)
    same = AttentionEditor(recorder.maps, [40], plan, alignment, None, FRAMES, torch.device("cpu"))
    with video.controlled(same):
        replayed = video(clip, T, cond, FRAMES)
    torch.testing.assert_close(replayed, plain, atol=2e-3, rtol=0)     # float16 storage
    swapped = AttentionEditor(recorded_other.maps, [40], plan, alignment, None, FRAMES, torch.device("cpu"))
    with video.controlled(swapped):
        fused = video(clip, T, cond, FRAMES)
    assert (fused - other_out).abs().mean() < (plain - other_out).abs().mean()
    late = AttentionEditor(recorded_other.maps, [90, 40], FusionPlan(0.5, 0.5), alignment, None, FRAMES,
                           torch.device("cpu"))
    with video.controlled(late):                                      # step 40 is past both fractions
        torch.testing.assert_close(video(clip, T, cond, FRAMES), plain, atol=1e-5, rtol=0)


def test_the_recorder_keeps_only_the_low_resolution_sites():
    video = VideoUNet(unet_2d(attention_levels=(0, 1)))
    recorder = AttentionRecorder(16)
    recorder.t = 7
    with torch.no_grad(), video.controlled(recorder):
        video(moving_video(), torch.full((FRAMES,), 7), condition(FRAMES), FRAMES)
    sites = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in recorder.maps}
    assert sites == {"down.1.units.0.attn", "mid.0.attn", "up.0.units.0.attn", "up.0.units.1.attn"}  # 8x8 only
    assert any(s.startswith("down.0") for s in video.sites)
