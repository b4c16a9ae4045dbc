"""Our SD backbone reproduces diffusers/transformers (and open_clip) outputs, and CompVis files round-trip.

Small random-weight models, float32. v1-shaped: 1x1-conv projections, 8 heads, quick_gelu text;
v2-shaped: linear projections, per-level heads, gelu text (penultimate layer in CompVis files).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402

from tiny_sd import randomize  # noqa: E402

from ctxdiff.models.latent import LatentTextConfig, LatentTextEncoder, load_sd, save_compvis, tokenize  # noqa: E402
from ctxdiff.models.latent.convert import (  # noqa: E402
    OPENCLIP_PREFIX, detect_unet_config, detect_vae_config, text_from_compvis, to_compvis,
)

TOL = 1e-4
UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
FLAVOURS = {
    "v1": dict(unet=dict(attention_head_dim=8, use_linear_projection=False), act="quick_gelu",
               prediction_type="epsilon"),
    "v2": dict(unet=dict(attention_head_dim=(2, 4, 4), use_linear_projection=True), act="gelu",
               prediction_type="v_prediction"),
}
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
PROMPTS = ["a red square above a blue circle", "an astronaut riding a horse, oil painting"]


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def case(request, tmp_path_factory):
    """A diffusers folder of random small models, their diffusers/transformers objects, and our load of it."""
    flavour = FLAVOURS[request.param]
    folder = tmp_path_factory.mktemp(f"sd-{request.param}")
    unet = randomize(diffusers.UNet2DConditionModel(**UNET, **flavour["unet"]), 0)
    vae = randomize(diffusers.AutoencoderKL(**VAE), 1)
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, hidden_act=flavour["act"])), 2)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000, "prediction_type": flavour["prediction_type"]}))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    return dict(name=request.param, folder=folder, unet=unet, vae=vae, text=text, ours=load_sd(folder),
                prediction_type=flavour["prediction_type"])


def _inputs():
    g = torch.Generator().manual_seed(3)
    return dict(latents=torch.randn(2, 4, 8, 8, generator=g), tau=torch.tensor([0, 999]),
                context=torch.randn(2, 77, 32, generator=g), image=torch.rand(1, 3, 16, 16, generator=g) * 2 - 1)


def _outputs(models, ids):
    x = _inputs()
    with torch.no_grad():
        dist = models.vae.encode(x["image"])
        cond = models.text(ids)
        return dict(unet=models.unet(x["latents"], x["tau"], x["context"]), mean=dist.mean, std=dist.std,
                    decoded=models.vae.decode(x["latents"][:1]), tokens=cond.tokens, pooled=cond.pooled)


def _err(a, b) -> float:
    return (a - b).abs().max().item()


def test_unet_matches_diffusers(case):
    x = _inputs()
    with torch.no_grad():
        ours = case["ours"].unet(x["latents"], x["tau"], x["context"])
        ref = case["unet"](x["latents"], x["tau"], x["context"]).sample
    assert _err(ours, ref) <= TOL * ref.abs().max().clamp(min=1).item()


def test_vae_encode_and_decode_match_diffusers(case):
    x = _inputs()
    with torch.no_grad():
        ours, ref = case["ours"].vae.encode(x["image"]), case["vae"].encode(x["image"]).latent_dist
        assert _err(ours.mean, ref.mean) <= TOL and _err(ours.std, ref.std) <= TOL
        decoded, ref_decoded = case["ours"].vae.decode(x["latents"][:1]), case["vae"].decode(x["latents"][:1]).sample
    assert _err(decoded, ref_decoded) <= TOL


def test_vae_tiled_coding_matches_diffusers_tiling(case):
    g = torch.Generator().manual_seed(4)
    image, latents = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(1, 4, 12, 12, generator=g)
    ours, ref = case["ours"].vae, case["vae"]
    ours.enable_tiling(tile=16)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 16, 8
    try:
        with torch.no_grad():
            assert _err(ours.encode(image).mean, ref.encode(image).latent_dist.mean) <= TOL
            assert _err(ours.decode(latents), ref.decode(latents).sample) <= TOL
    finally:
        ours.disable_tiling()
        ref.disable_tiling()


def test_text_hidden_states_and_pooled_match_clip_text_model(case):
    ids = tokenize(PROMPTS, case["ours"].config.text.pad_token_id)
    with torch.no_grad():
        ours, ref = case["ours"].text(ids), case["text"](ids)
    assert _err(ours.tokens, ref.last_hidden_state) <= TOL
    assert _err(ours.pooled, ref.pooler_output) <= TOL


def test_penultimate_layer_matches_clip_text_model_hidden_states(case):
    config = LatentTextConfig(**{**case["ours"].config.text.to_dict(), "layer": "penultimate"})
    ours = LatentTextEncoder(config).eval()
    ours.load_state_dict(case["ours"].text.state_dict())
    ids = tokenize(PROMPTS, config.pad_token_id)
    with torch.no_grad():
        ref = case["text"](ids, output_hidden_states=True)
        expected = case["text"].final_layer_norm(ref.hidden_states[-2])
        assert _err(ours(ids).tokens, expected) <= TOL


def test_compvis_names_agree_with_diffusers_single_file_converter(case):
    ours = case["ours"]
    state = to_compvis(ours.unet, ours.vae, ours.text)
    unet = convert_ldm_unet_checkpoint(state, {"layers_per_block": UNET["layers_per_block"]})
    vae = convert_ldm_vae_checkpoint(state, dict(VAE))
    for converted, model in ((unet, case["unet"]), (vae, case["vae"])):
        reference = model.state_dict()
        assert set(converted) == set(reference)
        assert all(torch.equal(converted[k].reshape(reference[k].shape), reference[k]) for k in reference)


def test_compvis_single_file_round_trip_gives_identical_outputs(case, tmp_path):
    path = save_compvis(tmp_path / "model.safetensors", case["ours"])
    again = load_sd(path)
    assert again.prediction_type == case["prediction_type"]
    ids = tokenize(PROMPTS, case["ours"].config.text.pad_token_id)
    before, after = _outputs(case["ours"], ids), _outputs(again, ids)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unet_and_vae_configs_are_read_back_from_compvis_shapes(case):
    """Heads are not in the shapes: SD's rule gives 8 (conv projections) or 64 channels per head (linear)."""
    ours = case["ours"]
    state = to_compvis(ours.unet, ours.vae, ours.text)
    detected, expected = detect_unet_config(state), replace(ours.config.unet, sample_size=64)
    if case["name"] == "v1":
        assert detected == expected
    assert replace(detected, num_attention_heads=expected.num_attention_heads) == expected
    assert detect_vae_config(state) == ours.config.vae


def test_openclip_names_with_fused_in_proj_match_open_clip_penultimate_output():
    """SD 2.x single files store open_clip's text tower; SD uses its penultimate layer, then ln_final."""
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    tower = randomize(open_clip_transformer.TextTransformer(width=32, heads=4, layers=3, output_dim=32), 5)
    config = LatentTextConfig(width=32, layers=3, heads=4, intermediate_size=128, act="gelu", layer="penultimate",
                              pad_token_id=0)
    state = {OPENCLIP_PREFIX + k: v for k, v in tower.state_dict().items()}
    ours = LatentTextEncoder(config).eval()
    ours.load_state_dict(text_from_compvis(state, config))
    ids = tokenize(PROMPTS, 0)
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            x = block(x if tower.transformer.batch_first else x.transpose(0, 1), attn_mask=tower.attn_mask)
            x = x if tower.transformer.batch_first else x.transpose(0, 1)
        expected = tower.ln_final(x)
        assert _err(ours(ids).tokens, expected) <= TOL


def test_attention_chunking_does_not_change_the_unet_output(case):
    x = _inputs()
    unet = case["ours"].unet
    with torch.no_grad():
        whole = unet(x["latents"], x["tau"], x["context"])
        unet.set_attention_chunk(7)
        try:
            chunked = unet(x["latents"], x["tau"], x["context"])
        finally:
            unet.set_attention_chunk(None)
    assert _err(whole, chunked) <= 1e-5


def test_diffusers_folder_gives_configs_and_prediction_type(case):
    ours = case["ours"]
    assert ours.prediction_type == case["prediction_type"]
    assert ours.config.unet.use_linear_projection == (case["name"] == "v2")
    assert ours.config.text.pad_token_id == (0 if case["name"] == "v2" else 49407)
    assert {k: v.shape for k, v in ours.unet.state_dict().items()} == {
        k: v.shape for k, v in case["unet"].state_dict().items()}
