"""Video editing on a Stable Diffusion backbone: the inflated latent U-Net, and tune-video / invert /
edit through the CLI on tiny random SD-shaped checkpoints (16x16 frames, 8x8 latents)."""

import copy
import json

import numpy as np
import pytest
import torch

from ctxdiff.checkpoints import load_bundle
from ctxdiff.cli import main
from ctxdiff.data.video import read_video, write_video
from ctxdiff.formats.inversion import InversionParams
from ctxdiff.formats.latent_adapter import save_latent_adapter
from ctxdiff.formats.tuned import TUNED_KIND
from ctxdiff.models.adapter import AdapterConfig, build_adapter
from ctxdiff.models.inflate import VideoUNet
from ctxdiff.models.latent import LatentUNet, save_compvis
from ctxdiff.pipelines.attention_control import align_tokens
from ctxdiff.pipelines.latent_video import LatentVideoModel
from ctxdiff.pipelines.video import load_video_model
from ctxdiff.pipelines.video_edit import invert_video, read_source, reconstruct
from ctxdiff.recipes import SampleConfig
from ctxdiff.shapes.world import moving_shape_video
from helpers import perturbed
from tiny_sd import TINY_SD, tiny_sd_models

FRAMES = 4
SRC, TGT = "a red circle moving to the right", "a blue circle moving to the right"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    return {"a": save_compvis(folder / "a.safetensors", tiny_sd_models(0)),
            "b": save_compvis(folder / "b.safetensors", tiny_sd_models(1))}


@pytest.fixture
def video(tmp_path):
    clip = moving_shape_video(SRC, frames=8, size=16, seed=7)
    return write_video(tmp_path / "red-circle", clip.frames, fps=8, metadata={"prompt": SRC})


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- the inflated SD U-Net -------------------------------------------------------------------------

def flat_unet() -> LatentUNet:
    torch.manual_seed(0)
    return perturbed(LatentUNet(TINY_SD.unet)).eval()


def test_inflated_sd_unet_keeps_every_2d_weight_and_adds_only_zero_output_temporal_layers():
    flat = flat_unet()
    state_2d = copy.deepcopy(flat.state_dict())
    video = VideoUNet(flat)
    state = video.unet.state_dict()
    assert all(torch.equal(state_2d[k], state[k]) for k in state_2d)
    new = set(state) - set(state_2d)
    assert new and all(".temporal." in k for k in new)
    assert all(torch.count_nonzero(state[k]) == 0 for k in new if ".temporal.to_out." in k)
    assert video.sites[0] == "down_blocks.0.attentions.0.transformer_blocks.0" and len(video.sites) == 4
    assert {n.split(".")[-2] for n in video.tunable_state() if ".temporal." not in n} == {"to_q"}


@torch.no_grad()
def test_inflated_sd_unet_equals_the_2d_unet_on_a_static_video_and_on_frame_0():
    flat = flat_unet()
    video = VideoUNet(copy.deepcopy(flat))
    torch.manual_seed(3)
    context = torch.randn(1, 7, 64).repeat(FRAMES, 1, 1)
    still = torch.randn(1, 4, 8, 8).repeat(FRAMES, 1, 1, 1)
    torch.testing.assert_close(video(still, 500, context, FRAMES), flat(still, 500, context), atol=2e-5, rtol=0)
    moving = torch.randn(FRAMES, 4, 8, 8)
    out, ref = video(moving, 500, context, FRAMES), flat(moving, 500, context)
    torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=0)    # frame 0 sees only itself
    assert (out[1:] - ref[1:]).abs().max() > 1e-3                    # later frames see frame 0
    changed = moving.clone()
    changed[2] += 1.0
    after = video(changed, 500, context, FRAMES)
    assert torch.equal(after[:2], out[:2]) and (after[3] - out[3]).abs().max() > 1e-4   # causal


def test_gradient_checkpointing_gives_the_same_gradients():
    video = VideoUNet(flat_unet()).train()
    torch.manual_seed(4)
    x, context = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 64)
    grads = []
    for enabled in (False, True):
        video.set_gradient_checkpointing(enabled)
        video.zero_grad()
        video(x, 300, context, FRAMES).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in video.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_sd_cross_attention_columns_start_at_the_start_token():
    """SD has no null key: column 0 is the start token, so 'red' (token 2) is column 2, not 3."""
    source, target = [49406, 320, 736, 49407], [49406, 320, 1746, 49407]
    assert align_tokens(source, target, 77, "replace", first=0).edited == (2,)
    assert align_tokens(source, target, 78, "replace", first=1).edited == (3,)


# -- the latent video model ------------------------------------------------------------------------

def test_frames_round_trip_through_the_vae_and_inversion_trajectory_is_in_latent_space(sd, video):
    model = load_video_model(sd["a"])
    assert isinstance(model, LatentVideoModel) and model.image_size == 16 and model.grid_size == 8
    clip = read_source(video, FRAMES, 2, 0, model.image_size)
    z = model.to_model(clip.frames)
    assert z.shape == (FRAMES, 4, 8, 8)
    vae = model.models.vae
    expected = vae.encode(torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1).mean
    torch.testing.assert_close(z, expected * vae.config.scaling_factor)
    inversion = invert_video(model, clip, SRC, InversionParams(steps=5, spacing="leading", attention=True))
    assert inversion.trajectory.shape == (5, FRAMES, 4, 8, 8) and torch.equal(inversion.trajectory[0], z)
    assert {k.rsplit(".", 1)[1] for k in inversion.attention} == {"self", "cross"}
    for key, maps in inversion.attention.items():    # sparse-causal: frames 0 and f-1; SD's 77 tokens, no null key
        assert maps.shape[-2] <= 4 * 4 and maps.shape[-1] == (2 * maps.shape[-2] if key.endswith("self") else 77)
    back = reconstruct(model, inversion)
    assert back.frames.shape == clip.frames.shape and np.isfinite(back.latent_error)


def test_plain_sd_video_without_adapter_reduces_to_per_frame_ddim_on_a_static_video(sd, tmp_path):
    """r = 0, fresh temporal layers (zero output), a static clip: every frame's inversion equals the
    2D SD model's DDIM inversion of that frame (the inflation changes nothing)."""
    model = load_video_model(sd["a"])
    still = moving_shape_video(SRC, frames=2, size=16, seed=7).frames[:1].repeat(FRAMES, axis=0)
    folder = write_video(tmp_path / "still", still, fps=8)
    clip = read_source(folder, FRAMES, 1, 0, 16)
    video_inv = invert_video(model, clip, SRC, InversionParams(steps=4, spacing="leading"))
    single = read_source(folder, 1, 1, 0, 16)
    image_inv = invert_video(model, single, SRC, InversionParams(steps=4, spacing="leading"))
    for f in range(FRAMES):
        torch.testing.assert_close(video_inv.trajectory[:, f], image_inv.trajectory[:, 0], atol=1e-4, rtol=0)


def test_edict_inversion_of_a_tiny_sd_model_is_exact_in_latent_space(sd, video):
    """Exact inversion (docs/math.md#exact-inversion) on random SD-shaped weights, with a fresh
    spatio-temporal adapter made non-zero: sampling back returns the VAE latents of the clip."""
    from ctxdiff.pipelines.video_edit import sample_back

    model = load_video_model(sd["a"])
    model.adapter = perturbed(model.new_adapter(window=3), 0.1).eval()
    clip = read_source(video, FRAMES, 2, 0, model.image_size)
    inversion = invert_video(model, clip, SRC, InversionParams(steps=6, method="edict", max_t=950))
    z = model.to_model(clip.frames)
    cond = model.encode(SRC, FRAMES)
    back = sample_back(model, inversion, model.x0_fn(FRAMES), cond, model.adapter_fn(FRAMES))
    assert (back - z).abs().max() < 1e-4
    assert (model.adapter_fn(FRAMES)(z, cond, torch.full((FRAMES,), 500)).abs().max()) > 1e-3   # r != 0


# -- the CLI ---------------------------------------------------------------------------------------

def test_tune_invert_edit_on_stable_diffusion_through_the_cli(sd, video, tmp_path, capsys):
    run = tmp_path / "tune"
    assert main(["--json", "tune-video", str(video), "--model", str(sd["a"]), "--frames", str(FRAMES), "--steps", "2",
                 "--lr", "1e-3", "--out", str(run)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["step"] == 2 and np.isfinite(record["loss"])
    tuned = run / "tuned.safetensors"
    bundle = load_bundle(tuned, kind=TUNED_KIND)
    assert bundle.extra["backbone"] == "sd" and set(bundle.tensors) == {"unet", "adapter"}
    assert bundle.configs["video_adapter"]["adapter"]["x_shape"] == [4, 8, 8]
    assert tuned.stat().st_size < 0.5 * sd["a"].stat().st_size

    inv = tmp_path / "red.inversion.safetensors"
    assert main(["--json", "invert", str(video), "--tuned", str(tuned), "--steps", "4", "--attention",
                 "--out", str(inv)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["frames"] == 8 and record["attention_maps"] > 0 and record["adapter"] is True   # the whole clip
    out = tmp_path / "blue.mp4"
    assert main(["--json", "edit", str(video), "--tuned", str(tuned), "--inversion", str(inv), "--tgt", TGT,
                 "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["cross_mode"] == "replace" and record["frames"] == 8
    back = read_video(out)
    assert back.frames.shape == (8, 16, 16, 3) and back.fps == pytest.approx(8.0)   # the source's rate


def test_zero_shot_sd_edit_with_a_latent_adapter_file(sd, video, tmp_path, capsys):
    models = tiny_sd_models(0)
    config = AdapterConfig(x_shape=(4, 8, 8), patch_size=4, width=32, heads=2, blocks=1, text_dim=64)
    torch.manual_seed(5)
    adapter = perturbed(build_adapter(config, None, models.vae))
    adapter_file = save_latent_adapter(tmp_path / "adapter.safetensors", adapter, None, str(sd["a"]), models,
                                       SampleConfig())
    out = tmp_path / "blue"
    assert main(["--json", "edit", str(video), "--model", str(sd["a"]), "--adapter", str(adapter_file),
                 "--frames", str(FRAMES), "--steps", "3", "--tgt", "a big blue circle moving to the right",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "using refine" in captured.err                        # different token counts
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["adapter"] is True and record["cross_mode"] == "refine"
    assert read_video(out).frames.shape == (FRAMES, 16, 16, 3)
    assert main(["edit", str(video), "--model", str(sd["b"]), "--adapter", str(adapter_file), "--tgt", TGT,
                 "--out", str(tmp_path / "other")]) == 1
    assert "another Stable Diffusion backbone" in one_line_error(capsys)


def test_a_tuned_sd_file_is_refused_over_another_checkpoint(sd, video, tmp_path, capsys):
    run = tmp_path / "tune"
    assert main(["tune-video", str(video), "--model", str(sd["a"]), "--frames", str(FRAMES), "--steps", "1",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["edit", str(video), "--model", str(sd["b"]), "--tuned", str(run / "tuned.safetensors"),
                 "--tgt", TGT]) == 1
    assert "tuned for another base model" in one_line_error(capsys)


def test_adapter_option_with_a_pixel_model_is_a_one_line_error(video, tmp_path, capsys, sd):
    from ctxdiff.formats.t2i import DEFAULT_MODEL
    assert main(["edit", str(video), "--model", str(DEFAULT_MODEL), "--adapter", str(sd["a"]), "--tgt", TGT,
                 "--out", str(tmp_path / "x")]) == 2
    assert "--adapter: only for Stable Diffusion" in one_line_error(capsys)


def test_half_precision_sd_tunes_float32_master_weights_under_autocast(sd, video, tmp_path):
    """SD on CUDA runs in fp16; here bf16 on the CPU stands in: the tuned tensors stay finite and are
    float32 while tuning, and the U-Net is back in its own precision afterwards."""
    from ctxdiff.training.tune_video import TuneConfig, VideoTuner

    model = load_video_model(sd["a"])
    model.models.unet.to(torch.bfloat16)
    clip = read_source(video, FRAMES, 2, 0, model.image_size)
    tuner = VideoTuner(model, clip, SRC, TuneConfig(steps=3, lr=1e-3, checkpoint_every=10), tmp_path / "run")
    assert all(p.dtype == torch.float32 for p in tuner.params)
    result = tuner.run()
    assert np.isfinite(result.loss)
    tuned = model.unet.tunable_state()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in tuned.values())
    assert any(p.abs().max() > 0 for n, p in tuned.items() if ".temporal.to_out." in n)   # it learned


def test_end_tuning_after_single_steps_puts_a_half_precision_unet_back_for_inversion(sd, video, tmp_path):
    """Driving `train_step` directly (as the cost benchmark does) leaves float32 master weights in a
    half-precision U-Net; `end_tuning` casts them back so inversion does not mix dtypes."""
    from ctxdiff.training.tune_video import TuneConfig, VideoTuner

    model = load_video_model(sd["a"])
    model.models.unet.to(torch.bfloat16)
    clip = read_source(video, FRAMES, 2, 0, model.image_size)
    tuner = VideoTuner(model, clip, SRC, TuneConfig(steps=3, lr=1e-3, checkpoint_every=10), tmp_path / "run")
    tuner.train_step()
    assert all(p.dtype == torch.float32 for p in model.unet.tunable_state().values())
    tuner.end_tuning()
    assert all(p.dtype == torch.bfloat16 for p in model.unet.tunable_state().values())
    inverted = invert_video(model, clip, SRC, InversionParams(steps=2))
    assert torch.isfinite(inverted.trajectory[-1].float()).all()


def test_refine_maps_padding_after_the_end_token_to_the_source_padding():
    source, target = [49406, 320, 736, 49407], [49406, 320, 1205, 1746, 49407]
    alignment = align_tokens(source, target, 8, "refine", first=0)
    assert alignment.source_of.tolist() == [0, 1, 2, 3, 3, 4, 5, 6]   # 'a' and EOT follow; pads shift by one
    assert alignment.aligned.tolist() == [1, 1, 0, 0, 1, 1, 1, 1] and alignment.edited == (2,)


def test_model_refs_hash_a_diffusers_folder_by_its_parts_through_symlinks(tmp_path):
    from ctxdiff.errors import CtxdiffError
    from ctxdiff.formats.model_ref import ModelRef

    blobs, folder = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    (folder / "unet").mkdir(parents=True)
    (blobs / "w").write_bytes(b"weights")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(blobs / "w")
    (folder / "model_index.json").write_text("{}")
    first = ModelRef.of(folder).sha256
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("ignored")
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "model.bin").write_text("ignored")
    assert ModelRef.of(folder).sha256 == first
    (folder / "unet" / "config.json").write_text("{}")
    assert ModelRef.of(folder).sha256 != first
    with pytest.raises(CtxdiffError, match="no such model"):
        ModelRef.of(tmp_path / "absent")
