"""ContextDiff over a Stable Diffusion backbone: the frozen-backbone math, sampling, adapter files,
training with exact resume, and the CLI, on tiny random SD-shaped checkpoints (seconds on a CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from ctxdiff.checkpoints import latest_checkpoint, load_bundle, load_training_state, save_bundle
from ctxdiff.cli import main
from ctxdiff.data.png import read_png_metadata
from ctxdiff.diffusion import diffusion_loss, make_schedule, q_sample
from ctxdiff.diffusion.schedule import schedule_from_alpha_bar
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.latent_adapter import LatentAdapterFile
from ctxdiff.formats.latent_adapter import is_sd_model, save_latent_adapter
from ctxdiff.models.adapter import AdapterConfig, build_adapter
from ctxdiff.models.adapter import DecodedClipTokens
from ctxdiff.models.encoders import ClipConfig, load_clip
from ctxdiff.models.latent import LatentModels, LatentSDConfig, SchedulerInfo, load_sd, save_compvis
from ctxdiff.models.latent.fingerprint import fingerprint
from ctxdiff.pipelines.latent import SD_DEFAULTS, LatentText2Image
from ctxdiff.pipelines.text2image import seeded_noise
from ctxdiff.recipes import SampleConfig
from ctxdiff.training import latent_adapter
from ctxdiff.training.latent_adapter import LatentAdapterTrainer
from ctxdiff.training.recipe import read_recipe
from tiny_sd import TINY_SD, tiny_sd_models

ADAPTER = AdapterConfig(x_shape=(4, 8, 8), patch_size=4, width=32, heads=2, blocks=1, text_dim=64)
PROMPTS = ["a red square", "a blue circle on the left"]

RECIPE = """
output: {output}
latent: {{sd_checkpoint: {sd}}}
model:
  clip: {{arch: tiny-clip}}
  adapter: {{x_shape: [4, 8, 8], patch_size: 4, width: 32, heads: 2, blocks: 1, text_dim: 64,
            image_branch: {branch}, image_dim: {image_dim}}}
diffusion: {{schedule: scaled_linear, timesteps: 1000, cond_drop_prob: 0.2}}
data: {{source: shapes, image_size: 16, shapes_count: 20}}
train: {{steps: 4, batch_size: 2, lr: 0.001, warmup_steps: 1, ema_decay: 0.9, checkpoint_every: 2, keep_last: 2,
        sample_every: 0, log_every: 1}}
sample: {{steps: 3, guidance: 7.5}}
"""


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return save_compvis(tmp_path_factory.mktemp("sd") / "tiny-sd.safetensors", tiny_sd_models(0))


@pytest.fixture(scope="module")
def other_sd_path(tmp_path_factory):
    return save_compvis(tmp_path_factory.mktemp("sd") / "other-sd.safetensors", tiny_sd_models(1))


@pytest.fixture
def recipe(tmp_path, sd_path):
    def make(name: str = "run", branch: str = "patch") -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(RECIPE.format(output=tmp_path / name, sd=sd_path, branch=branch,
                                      image_dim=32 if branch == "clip" else 0))
        return str(path)
    return make


def _live_adapter(models: LatentModels, config: AdapterConfig = ADAPTER, clip=None, seed: int = 0):
    """An adapter whose zero-initialised head is randomised, so r != 0."""
    adapter = build_adapter(config, clip, models.vae)
    torch.manual_seed(seed)
    torch.nn.init.normal_(adapter.head.weight, std=0.05)
    return adapter.eval()


def _cond(pipe: LatentText2Image, n: int):
    return pipe.encode(PROMPTS[:n])


# --------------------------------------------------------------------------- the math


def test_schedule_from_alpha_bar_reproduces_the_sd_schedule():
    sched = schedule_from_alpha_bar(SchedulerInfo().alphas_cumprod())
    ref = make_schedule("scaled_linear", 1000)
    for name in ("betas", "alphas", "alpha_bar", "k"):
        assert torch.allclose(getattr(sched, name), getattr(ref, name), rtol=0, atol=1e-12), name
    assert sched.T == 1000 and sched.k[0] == 0 and sched.betas[0] == 0
    with pytest.raises(ValueError, match="paper-indexed"):
        schedule_from_alpha_bar(SchedulerInfo().alphas_cumprod()[1:])


def test_adapter_learns_through_the_frozen_unet_input():
    """The chosen math: the U-Net sees z_t, bias included, so Eq. 6 has a gradient for r_phi only."""
    models = tiny_sd_models(0)
    models.unet.requires_grad_(False)
    pipe = LatentText2Image(models, None)
    adapter = _live_adapter(models).train()
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    loss = diffusion_loss(pipe.sched, pipe.x0_fn, z0, _cond(pipe, 2), adapter, t=torch.tensor([300, 900]),
                          noise=noise)
    loss.backward()
    assert adapter.head.weight.grad.abs().sum() > 0 and adapter.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in models.unet.parameters())


def test_a_debiased_unet_input_would_leave_the_adapter_without_gradient():
    """The rejected alternative: showing the U-Net z_t - k_t r_t(z_0) cancels phi exactly (dL/dphi = 0)."""
    models = tiny_sd_models(0)
    pipe = LatentText2Image(models, None)
    adapter = _live_adapter(models).train()
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, cond = torch.tensor([300, 900]), _cond(pipe, 2)
    bias = pipe.sched.at("k", t, z0) * adapter(z0, cond, t)
    z_t = q_sample(pipe.sched, z0, t, adapter, cond, noise)
    x0_hat = pipe.x0_fn(z_t - bias, cond, t)   # plain SD on the debiased input
    ((z0 - x0_hat) ** 2).mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in adapter.parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_no_adapter_sampling_is_plain_ddim_of_the_backbone(prediction_type):
    """--no-adapter (r = 0, same code path) equals diffusers' DDIMScheduler with classifier-free guidance on
    the U-Net output, step for step (trailing spacing, final alpha 1)."""
    diffusers = pytest.importorskip("diffusers")
    models = tiny_sd_models(0, prediction_type=prediction_type)
    pipe = LatentText2Image(models, _live_adapter(models))
    params = SD_DEFAULTS.__class__(steps=5, guidance=7.5, adapter=False)
    ours = pipe.sample_latents(PROMPTS, [3, 4], params)

    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                                        prediction_type=prediction_type)
    scheduler.set_timesteps(5)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    z = seeded_noise([4, 8, 8], generators, "cpu")
    context = torch.cat([pipe.encode([""] * 2).tokens, pipe.encode(PROMPTS).tokens])
    with torch.no_grad():
        for tau in scheduler.timesteps:
            out_u, out_c = models.unet(torch.cat([z, z]), tau.repeat(4), context).chunk(2)
            z = scheduler.step(out_u + 7.5 * (out_c - out_u), tau, z).prev_sample
    assert (ours - z).abs().max() < 1e-5 * z.abs().max()
    again = LatentText2Image(models, None).sample_latents(PROMPTS, [3, 4], params)
    assert torch.equal(ours, again)


def test_a_fresh_adapter_samples_exactly_plain_sd_and_a_trained_one_does_not():
    """The zero-initialised head gives r = 0: a new adapter leaves a pretrained backbone undisturbed."""
    models = tiny_sd_models(0)
    params = SD_DEFAULTS.__class__(steps=4, guidance=7.5)
    plain = LatentText2Image(models, None).sample_latents(PROMPTS, [1, 2], params)
    fresh = LatentText2Image(models, build_adapter(ADAPTER, None, models.vae))
    assert torch.equal(fresh.sample_latents(PROMPTS, [1, 2], params), plain)
    live = LatentText2Image(models, _live_adapter(models)).sample_latents(PROMPTS, [1, 2], params)
    assert (live - plain).abs().max() > 1e-3


def test_clip_branch_tokens_come_from_the_decoded_image_and_equal_halves_decode_once():
    models = tiny_sd_models(0)
    clip = load_clip(ClipConfig(arch="tiny-clip"))
    decoded = []
    original = models.vae.decode
    models.vae.decode = lambda z: decoded.append(z.shape[0]) or original(z)
    encoder = DecodedClipTokens(models.vae, clip)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        stacked = encoder(torch.cat([z, z]))
        direct = clip.encode_image(original(z / models.config.vae.scaling_factor))[0]
    assert decoded == [2] and torch.allclose(stacked, torch.cat([direct, direct]), atol=1e-6)


# --------------------------------------------------------------------------- adapter files


def test_fingerprint_accepts_half_precision_copies_and_tells_backbones_apart(sd_path, other_sd_path):
    mark = fingerprint({"unet": load_sd(sd_path).unet})
    assert mark.same_weights(fingerprint({"unet": load_sd(sd_path, dtype=torch.float16).unet}))
    assert mark.same_weights(fingerprint({"unet": load_sd(sd_path, dtype=torch.bfloat16).unet}))
    other = fingerprint({"unet": load_sd(other_sd_path).unet})
    assert mark.same_architecture(other) and not mark.same_weights(other)


def _adapter_file(tmp_path, sd_path, clip=None, config=ADAPTER):
    models = load_sd(sd_path)
    adapter = _live_adapter(models, config, clip)
    path = save_latent_adapter(tmp_path / "adapter.safetensors", adapter, clip, str(sd_path), models,
                               SampleConfig(steps=3, guidance=6.0))
    return path, adapter


def test_adapter_file_reloads_over_its_backbone_and_samples_as_saved(tmp_path, sd_path):
    clip = load_clip(ClipConfig(arch="tiny-clip"))
    config = AdapterConfig(**{**ADAPTER.__dict__, "image_branch": "clip", "image_dim": 32})
    path, adapter = _adapter_file(tmp_path, sd_path, clip, config)
    pipe = LatentText2Image.from_checkpoint(sd_path, path)
    assert pipe.defaults.guidance == 6.0 and pipe.defaults.steps == 3
    direct = LatentText2Image(load_sd(sd_path), adapter)
    params = SD_DEFAULTS.__class__(steps=3, guidance=6.0)
    assert torch.equal(pipe.sample_latents(PROMPTS, [5, 6], params), direct.sample_latents(PROMPTS, [5, 6], params))


def test_adapter_for_another_backbone_is_refused(tmp_path, sd_path, other_sd_path):
    path, _ = _adapter_file(tmp_path, sd_path)
    with pytest.raises(CtxdiffError, match="trained on another Stable Diffusion backbone") as info:
        LatentText2Image.from_checkpoint(other_sd_path, path)
    assert "other weights" in str(info.value) and "\n" not in str(info.value)
    wider = LatentSDConfig(TINY_SD.unet.__class__(**{**TINY_SD.unet.__dict__, "block_out_channels": (32, 32)}),
                           TINY_SD.vae, TINY_SD.text)
    wider_path = save_compvis(tmp_path / "wider.safetensors", tiny_sd_models(0, wider))
    with pytest.raises(CtxdiffError, match="other architecture"):
        LatentText2Image.from_checkpoint(wider_path, path)


def test_model_detection_routes_sd_checkpoints_and_refuses_an_adapter_as_model(tmp_path, sd_path):
    assert is_sd_model(sd_path) and is_sd_model(tmp_path) and is_sd_model(tmp_path / "x.ckpt")
    bundle = save_bundle(tmp_path / "t2i.safetensors", {"m": torch.nn.Linear(1, 1)}, {}, kind="t2i")
    assert not is_sd_model(bundle)
    path, _ = _adapter_file(tmp_path, sd_path)
    with pytest.raises(CtxdiffError, match="pass it with --adapter"):
        is_sd_model(path)
    with pytest.raises(CtxdiffError, match="not a latent adapter"):
        LatentAdapterFile.read(sd_path)


# --------------------------------------------------------------------------- training


def _trained(recipe_path, overrides=(), stop_after=None, resume=False):
    trainer = LatentAdapterTrainer(read_recipe(recipe_path, list(overrides)), torch.device("cpu"), resume=resume)
    stop = (lambda: trainer.step >= stop_after) if stop_after else (lambda: False)
    return trainer, trainer.run(should_stop=stop)


@pytest.mark.parametrize("branch", ["patch", "clip"])
def test_latent_resume_after_interrupt_is_bit_identical(recipe, branch):
    full, _ = _trained(recipe("full", branch))
    part, result = _trained(recipe("part", branch), stop_after=1)
    assert result.interrupted and result.step == 1
    resumed, result = _trained(recipe("part", branch), resume=True)
    assert result.step == 4 and not result.interrupted
    for ours, theirs in ((full.adapter, resumed.adapter), (full.ema.shadow, resumed.ema.shadow)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert any(p.abs().sum() > 0 for p in full.adapter.head.parameters())   # it did learn something


def test_cli_trains_an_adapter_from_a_recipe_and_generates_with_it(recipe, tmp_path, sd_path, capsys):
    assert main(["--json", "train", "--recipe", recipe()]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    adapter = tmp_path / "run" / "adapter.safetensors"
    assert summary["model"] == str(adapter) and summary["step"] == 4
    bundle = load_bundle(adapter, kind="latent-adapter")
    assert bundle.configs["backbone"]["path"] == str(sd_path) and bundle.extra["step"] == 4
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in lines)
    state = load_training_state(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert set(state["adapter"]) == set(bundle.tensors["adapter"])   # the backbone is not in the checkpoint

    out = tmp_path / "out"
    assert main(["--json", "generate", PROMPTS[0], "--model", str(sd_path), "--adapter", str(adapter),
                 "--seed", "2", "--height", "24", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    meta = read_png_metadata(record["path"])
    assert meta["adapter_file"] == str(adapter) and meta["adapter"] is True and meta["steps"] == 3
    assert meta["guidance"] == 7.5
    assert Image.open(record["path"]).size == (16, 24)


def test_cli_interrupt_then_resume_gives_the_uninterrupted_adapter_bit_for_bit(recipe, tmp_path, monkeypatch):
    from contextlib import contextmanager

    from ctxdiff.cli import train as train_cli

    asked = {"n": 0}

    @contextmanager
    def ctrl_c_after_two_steps():
        def stop() -> bool:   # what a Ctrl-C during step 2 sets
            asked["n"] += 1
            return asked["n"] >= 2
        yield stop

    cpu = ["--device", "cpu"]  # bit-identity is a CPU claim: CUDA kernels need not be deterministic
    assert main([*cpu, "train", "--recipe", recipe("full", "clip")]) == 0
    monkeypatch.setattr(train_cli, "graceful_interrupt", ctrl_c_after_two_steps)
    assert main([*cpu, "train", "--recipe", recipe("part", "clip")]) == 130
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step-00000002.pt"
    monkeypatch.undo()
    assert main([*cpu, "train", "--recipe", recipe("part", "clip"), "--resume"]) == 0
    full, part = (load_bundle(tmp_path / run / "adapter.safetensors") for run in ("full", "part"))
    assert full.extra["step"] == part.extra["step"] == 4
    for module in ("adapter", "clip"):
        for name, value in full.tensors[module].items():
            assert torch.equal(value, part.tensors[module][name]), f"{module}.{name}"


def test_cli_rejects_recipe_values_that_do_not_fit_the_backbone(recipe, capsys):
    for override, named in (("diffusion.schedule=cosine", "diffusion.schedule"),
                            ("model.adapter.x_shape=[4,4,4]", "model.adapter.x_shape"),
                            ("model.adapter.text_dim=32", "text_dim")):
        assert main(["train", "--recipe", recipe(), "--set", override]) in (1, 2)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err


def test_nan_loss_stops_latent_training_and_keeps_the_last_good_checkpoint(recipe, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = latent_adapter.diffusion_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(latent_adapter, "diffusion_loss", flaky)
    with pytest.raises(CtxdiffError, match="step 3"):
        _trained(recipe())
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002.pt"


def test_sd15_recipe_follows_the_paper_at_512_pixels():
    r = read_recipe("recipes/sd15-adapter.yaml", ["latent.sd_checkpoint=/models/v1-5.safetensors"])
    assert r.latent.sd_checkpoint == "/models/v1-5.safetensors" and r.data.image_size == 512
    assert r.model.adapter.x_shape == (4, 64, 64) and r.model.adapter.text_dim == 768
    assert (r.model.adapter.heads, r.model.adapter.blocks) == (8, 4)                 # Sec. 4.1, App. C
    assert (r.train.lr, r.train.batch_size, r.train.warmup_steps) == (1e-4, 1024, 10_000)   # Tab. 7
    assert r.train.adam_betas == (0.9, 0.999) and r.train.weight_decay == 0.0
    assert (r.diffusion.schedule, r.diffusion.timesteps) == ("scaled_linear", 1000)
    assert (r.sample.sampler, r.sample.steps, r.sample.guidance) == ("ddim", 50, 7.5)


# --------------------------------------------------------------------------- generate CLI


def test_cli_generates_from_a_tiny_sd_checkpoint_with_metadata(sd_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--json", "generate", *PROMPTS, "--model", str(sd_path), "--seed", "7", "--steps", "3",
                 "--vae-tiling", "--out", str(out)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seed"] for r in records] == [7, 8]
    for record in records:
        meta = read_png_metadata(record["path"])
        assert meta["prompt"] == record["prompt"] and meta["model"] == str(sd_path)
        assert (meta["steps"], meta["guidance"], meta["sampler"], meta["adapter"]) == (3, 7.5, "ddim", False)
        assert Image.open(record["path"]).size == (16, 16)    # the U-Net's sample size x the VAE's downscale
    assert main(["generate", PROMPTS[0], "--model", str(sd_path), "--seed", "7", "--steps", "3", "--no-adapter",
                 "--out", str(tmp_path / "plain")]) == 0
    plain = next((tmp_path / "plain").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(records[0]["path"])))


def test_non_sd_inputs_are_one_line_errors(tmp_path, sd_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    tensors = tmp_path / "random.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, str(tensors))
    t2i = save_bundle(tmp_path / "t2i.safetensors", {"m": torch.nn.Linear(1, 1)}, {}, kind="t2i")
    adapter, _ = _adapter_file(tmp_path, sd_path)
    cases = [(["--model", str(notes)], "notes.txt", 1),
             (["--model", str(tensors)], "no Stable Diffusion U-Net", 1),
             (["--model", str(adapter)], "pass it with --adapter", 1),
             (["--model", str(sd_path), "--adapter", str(sd_path)], "not a latent adapter", 1),
             (["--model", str(t2i), "--adapter", str(adapter)], "only for Stable Diffusion checkpoints", 2),
             (["--model", str(sd_path), "--height", "15"], "15 is not a multiple of 8", 2)]   # a bad value: usage
    for i, (args, message, code) in enumerate(cases):
        assert main(["generate", "x", *args, "--out", str(tmp_path / f"o{i}")]) == code, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
