"""Negative prompts, img2img, inpainting, LoRA and long prompts in the pipelines: against diffusers' loops with r = 0
on a tiny random SD model, and as claims on the bundled shapes-world model (whose images mean something)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from ctxdiff.data.png import to_uint8
from ctxdiff.errors import UsageError
from ctxdiff.models.latent import save_compvis
from ctxdiff.models.latent.lora import merge_lora
from ctxdiff.pipelines.init_image import InitImage
from ctxdiff.pipelines.latent import SD_DEFAULTS, LatentText2Image
from ctxdiff.pipelines.text2image import seeded_noise
from tiny_sd import tiny_sd_models

PROMPTS = ["a red square", "a blue circle on the left"]
NEGATIVE = ["blurry, low quality", "a green triangle"]


class SpyAdapter(nn.Module):
    """r = 0, remembering the text it was shown."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x0, cond, t):
        self.seen.append(cond.tokens.clone())
        return torch.zeros_like(x0)


@pytest.fixture(scope="module")
def models():
    return tiny_sd_models(0)


def _params(**kw):
    return replace(SD_DEFAULTS, **{"steps": 10, "guidance": 7.5, "adapter": False, **kw})


def _diffusers_ddim(models, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler


def _guided_eps(models, z, tau, context, w=7.5):
    out_u, out_c = models.unet(torch.cat([z, z]), tau.repeat(2 * z.shape[0]), context).chunk(2)
    return out_u + w * (out_c - out_u)


def _init(seed=5, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def test_an_empty_negative_prompt_is_todays_sampling_bit_for_bit(models):
    pipe = LatentText2Image(models, None)
    today = pipe.sample_latents(PROMPTS, [3, 4], _params())
    assert torch.equal(pipe.sample_latents(PROMPTS, [3, 4], _params(), negative=["", ""]), today)


def test_a_negative_prompt_is_the_unconditional_branch_as_in_diffusers(models):
    pipe = LatentText2Image(models, None)
    ours = pipe.sample_latents(PROMPTS, [3, 4], _params(), negative=NEGATIVE)
    scheduler = _diffusers_ddim(models, 10)
    z = seeded_noise([4, 8, 8], [torch.Generator().manual_seed(s) for s in (3, 4)], "cpu")
    context = torch.cat([pipe.encode(NEGATIVE).tokens, pipe.encode(PROMPTS).tokens])
    with torch.no_grad():
        for tau in scheduler.timesteps:
            z = scheduler.step(_guided_eps(models, z, tau, context), tau, z).prev_sample
    assert (ours - z).abs().max() < 1e-5 * z.abs().max()
    assert (ours - pipe.sample_latents(PROMPTS, [3, 4], _params())).abs().max() > 1e-3


def test_the_adapter_keeps_the_prompts_context_under_a_negative_prompt(models):
    spy = SpyAdapter()
    pipe = LatentText2Image(models, spy)
    pipe.sample_latents(PROMPTS, [3, 4], replace(_params(), adapter=True, steps=3), negative=NEGATIVE)
    prompt = pipe.encode(PROMPTS).tokens
    assert spy.seen and all(torch.equal(seen, prompt.repeat(len(seen) // 2, 1, 1)) for seen in spy.seen)


def test_sd_img2img_starts_from_eq1_of_the_init_latents_as_diffusers_img2img(models):
    pipe = LatentText2Image(models, None)
    image = _init()
    ours = pipe.sample_latents(PROMPTS, [3, 4], _params(), init=InitImage(image, 0.5))
    scheduler = _diffusers_ddim(models, 10)
    timesteps = scheduler.timesteps[10 - int(10 * 0.5):]                      # diffusers' get_timesteps
    noise = seeded_noise([4, 8, 8], [torch.Generator().manual_seed(s) for s in (3, 4)], "cpu")
    with torch.no_grad():
        x0 = models.vae.encode(image).mean * models.vae.config.scaling_factor
        z = scheduler.add_noise(x0, noise, timesteps[:1].repeat(2))
        context = torch.cat([pipe.encode(["", ""]).tokens, pipe.encode(PROMPTS).tokens])
        for tau in timesteps:
            z = scheduler.step(_guided_eps(models, z, tau, context), tau, z).prev_sample
    assert (ours - z).abs().max() < 1e-5 * z.abs().max()


def test_sd_inpainting_blends_the_known_latents_as_diffusers_inpaint_with_a_plain_unet(models):
    pipe = LatentText2Image(models, None)
    image = _init()
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :, :8] = 1                                                      # left half repainted (latent cells 0-3)
    init = InitImage(image, 0.6, mask)
    ours = pipe.sample_latents(PROMPTS, [3, 4], _params(), init=init)
    scheduler = _diffusers_ddim(models, 10)
    timesteps = scheduler.timesteps[10 - int(10 * 0.6):]
    noise = seeded_noise([4, 8, 8], [torch.Generator().manual_seed(s) for s in (3, 4)], "cpu")
    m = torch.nn.functional.interpolate(mask, size=(8, 8))
    with torch.no_grad():
        x0 = models.vae.encode(image).mean * models.vae.config.scaling_factor
        z = scheduler.add_noise(x0, noise, timesteps[:1].repeat(2))
        context = torch.cat([pipe.encode(["", ""]).tokens, pipe.encode(PROMPTS).tokens])
        for i, tau in enumerate(timesteps):
            z = scheduler.step(_guided_eps(models, z, tau, context), tau, z).prev_sample
            known = x0 if i == len(timesteps) - 1 else scheduler.add_noise(x0, noise, timesteps[i + 1:i + 2].repeat(2))
            z = (1 - m) * known + m * z
    assert (ours - z).abs().max() < 1e-5 * z.abs().max()
    assert torch.equal(ours[..., 4:], x0[..., 4:])                           # the known latents are the init's
    pixels = pipe.sample(PROMPTS, [3, 4], _params(), init=init)
    assert torch.equal(pixels[..., 8:], image[..., 8:])                      # and so are its pixels (overlay)


def test_img2img_output_moves_away_from_the_init_as_strength_grows(models):
    pipe = LatentText2Image(models, None)
    image = _init()
    x0 = models.vae.encode(image).mean * models.vae.config.scaling_factor
    distances = [(pipe.sample_latents(PROMPTS, [3, 4], _params(), init=InitImage(image, s)) - x0).abs().mean().item()
                 for s in (0.1, 0.4, 0.7, 1.0)]
    assert distances == sorted(distances) and distances[0] < 0.5 * distances[-1]


def test_bad_img2img_inputs_are_usage_errors(models):
    pipe = LatentText2Image(models, None)
    with pytest.raises(UsageError, match="strength"):
        pipe.sample(PROMPTS, [3, 4], _params(), init=InitImage(_init(), 1.5))
    with pytest.raises(UsageError, match="the mask is 8x8 but its init image 16x16"):
        pipe.sample(PROMPTS, [3, 4], _params(), init=InitImage(_init(), 0.5, torch.ones(1, 1, 8, 8)))
    with pytest.raises(UsageError, match="negative prompts for 2 prompts"):
        pipe.sample(PROMPTS, [3, 4], _params(), negative=["a", "b", "c"])


def test_long_prompts_sample_and_an_image_does_not_depend_on_its_batch(models):
    pipe = LatentText2Image(models, None)
    long = " ".join(["red"] * 100)
    both = pipe.sample_latents([PROMPTS[0], long], [3, 4], _params(steps=3))
    alone = pipe.sample_latents([PROMPTS[0]], [3], _params(steps=3))
    assert torch.equal(both[:1], alone)
    assert not torch.equal(pipe.sample_latents([long], [4], _params(steps=3)),
                           pipe.sample_latents([" ".join(["red"] * 75)], [4], _params(steps=3)))


def test_from_checkpoint_merges_the_loras_it_is_given(tmp_path, models):
    path = save_compvis(tmp_path / "sd.safetensors", models)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    g = torch.Generator().manual_seed(0)
    lora = tmp_path / "style.safetensors"
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.randn(4, 64, generator=g),
                                 f"{key}.lora_up.weight": torch.randn(32, 4, generator=g)}, str(lora))
    pipe = LatentText2Image.from_checkpoint(path, loras=[(lora, 0.5)])
    expected = tiny_sd_models(0)
    merge_lora(expected, lora, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(pipe.models.unet.state_dict().values(),
                                                 expected.unet.state_dict().values()))
    assert not torch.equal(pipe.models.unet.state_dict()[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
        models.unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"])
    assert [m.describe() for m in pipe.loras] == ["style.safetensors x0.5 (1 U-Net and 0 text-encoder weights)"]


# --------------------------------------------------------------------------- the bundled pixel model


@pytest.fixture(scope="module")
def shapes():
    from ctxdiff.formats.t2i import DEFAULT_MODEL
    from ctxdiff.pipelines.text2image import Text2Image
    pipe = Text2Image.from_bundle(DEFAULT_MODEL)
    return pipe, replace(pipe.defaults, steps=10, sr_steps=5)


def _shapes_init(pipe):
    from ctxdiff.shapes.render import render_scene
    from ctxdiff.shapes.world import scene_from_caption
    drawn = render_scene(scene_from_caption("a large red circle on the left"), size=pipe.image_size)
    return torch.from_numpy(np.array(drawn)).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_pixel_img2img_is_near_identical_at_strength_01_and_moves_away_as_it_grows(shapes):
    pipe, params = shapes
    image = _shapes_init(pipe)
    levels = []
    for strength in (0.1, 0.5, 1.0):
        out = pipe.sample(["a blue square on the right"], [0], params, init=InitImage(image, strength))
        levels.append(float(np.abs(to_uint8(out).astype(int) - to_uint8(image).astype(int)).mean()))
    assert levels == sorted(levels) and levels[0] < 3 and levels[-1] > 4 * levels[0]


def test_pixel_inpainting_keeps_the_unmasked_pixels(shapes):
    pipe, params = shapes
    image = _shapes_init(pipe)
    mask = torch.zeros(1, 1, *image.shape[-2:])
    mask[..., :, image.shape[-1] // 2:] = 1
    out = pipe.sample(["a blue square on the right"], [0], params, init=InitImage(image, 1.0, mask))
    half = image.shape[-1] // 2
    kept = np.abs(to_uint8(out).astype(int) - to_uint8(image).astype(int))[:, :, :half]
    changed = np.abs(to_uint8(out).astype(int) - to_uint8(image).astype(int))[:, :, half:]
    assert kept.max() <= 2 and changed.mean() > 4


def test_pixel_negative_prompt_changes_the_image_and_empty_is_todays(shapes):
    pipe, params = shapes
    today = pipe.sample(PROMPTS, [1, 2], params)
    assert torch.equal(pipe.sample(PROMPTS, [1, 2], params, negative=["", ""]), today)
    assert (pipe.sample(PROMPTS, [1, 2], params, negative=["a red square", ""]) - today)[0].abs().max() > 0.05


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler-a", "heun", "unipc", "ddpm", "euler-karras"])
def test_img2img_and_inpainting_run_with_every_solver(models, sampler):
    pipe = LatentText2Image(models, None)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    strength = 1.0 if sampler.endswith("-karras") else 0.5
    out = pipe.sample_latents(PROMPTS, [3, 4], _params(sampler=sampler, steps=4), init=InitImage(_init(), strength,
                                                                                                   mask))
    x0 = models.vae.encode(_init()).mean * models.vae.config.scaling_factor
    assert torch.isfinite(out).all() and torch.allclose(out[..., :4], x0[..., :4], atol=1e-6)


def test_karras_sigmas_cannot_start_below_the_top(models):
    pipe = LatentText2Image(models, None)
    with pytest.raises(UsageError, match="euler-karras places its Karras sigmas over the whole range"):
        pipe.sample_latents(PROMPTS, [3, 4], _params(sampler="euler-karras", steps=4), init=InitImage(_init(), 0.5))
