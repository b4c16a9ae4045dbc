"""Stable Diffusion loading: sizes, family detection, refusals, EMA, and the x0 conversion of SD outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import safetensors.torch
import torch

from ctxdiff.errors import CtxdiffError
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.latent import (
    LatentModels, LatentSDConfig, LatentTextConfig, LatentTextEncoder, LatentUNet, LatentUNetConfig, LatentVAE,
    LatentVAEConfig, SchedulerInfo, as_x0_predictor, load_sd, save_compvis,
)
from ctxdiff.models.latent.convert import (
    UNET_PREFIX, detect_text_config, detect_unet_config, detect_vae_config, ema_key, to_compvis,
)

# Small, but detectable from shapes alone: 8 heads in the U-Net, 64 channels per text head.
TINY = LatentSDConfig(
    LatentUNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                     num_attention_heads=8, cross_attention_dim=64),
    LatentVAEConfig(block_out_channels=(32, 32), layers_per_block=1),
    LatentTextConfig(width=64, layers=2, heads=1, intermediate_size=128))


class NotAWeight:
    """Unpickling this needs code: a checkpoint holding it must be refused."""


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny() -> LatentModels:
    torch.manual_seed(0)
    return LatentModels(LatentUNet(TINY.unet).eval(), LatentVAE(TINY.vae).eval(), LatentTextEncoder(TINY.text).eval(),
                        TINY, "epsilon", SchedulerInfo())


def _compvis_ckpt(path, state: dict[str, torch.Tensor]):
    torch.save({"state_dict": {k: v.clone() for k, v in state.items()}, "global_step": 10}, path)
    return path


def _save_tensors(path, tensors: dict[str, torch.Tensor]):
    safetensors.torch.save_file(tensors, str(path))
    return path


def test_sd15_unet_has_859_520_964_parameters():
    with torch.device("meta"):
        assert _count(LatentUNet(LatentUNetConfig.v1())) == 859_520_964


def test_sd2_unet_has_865_910_724_parameters():
    with torch.device("meta"):
        assert _count(LatentUNet(LatentUNetConfig.v2())) == 865_910_724


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_sd_architectures_are_detected_from_compvis_shapes(version):
    unet_config, text_config = getattr(LatentUNetConfig, version)(), getattr(LatentTextConfig, version)()
    with torch.device("meta"):
        state = to_compvis(LatentUNet(unet_config), LatentVAE(LatentVAEConfig()), LatentTextEncoder(text_config))
    assert detect_unet_config(state) == replace(unet_config, sample_size=64)
    assert detect_vae_config(state) == LatentVAEConfig()
    assert detect_text_config(state) == text_config


def test_sdxl_checkpoint_is_refused(tmp_path):
    path = _save_tensors(tmp_path / "sdxl.safetensors", {
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
        UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(2, 2),
        UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(CtxdiffError, match="not supported: detected SDXL"):
        load_sd(path)


def test_sdxl_diffusers_folder_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                           "text_encoder_2": ["transformers", "CLIPTextModel"]}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    with pytest.raises(CtxdiffError, match="not supported: detected SDXL"):
        load_sd(tmp_path)


def test_vae_only_checkpoint_is_refused(tmp_path):
    path = _save_tensors(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3),
                                                        "decoder.conv_in.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(CtxdiffError, match="this is a VAE-only checkpoint; pass a full Stable Diffusion checkpoint"):
        load_sd(path)


def test_truncated_checkpoint_gives_a_one_line_error(tiny, tmp_path):
    path = save_compvis(tmp_path / "model.safetensors", tiny)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CtxdiffError) as info:
        load_sd(path)
    assert "truncated" in str(info.value) and "\n" not in str(info.value)


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NotAWeight()}, path)
    with pytest.raises(CtxdiffError, match="refused"):
        load_sd(path)


def test_ema_weights_replace_the_unet_weights_when_present(tiny, tmp_path):
    state = to_compvis(tiny.unet, tiny.vae, tiny.text)
    ema = {ema_key(k): v + 1 for k, v in state.items() if k.startswith(UNET_PREFIX)}
    path = _compvis_ckpt(tmp_path / "ema.ckpt", {**state, **ema, "model_ema.decay": torch.tensor(0.9999)})
    loaded, plain = load_sd(path), load_sd(path, use_ema=False)
    assert loaded.used_ema and not plain.used_ema
    for key, value in tiny.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value + 1)
        assert torch.equal(plain.unet.state_dict()[key], value)


def test_compvis_ckpt_without_metadata_loads_by_shape_and_v1_predicts_epsilon(tiny, tmp_path):
    path = _compvis_ckpt(tmp_path / "sd.ckpt", to_compvis(tiny.unet, tiny.vae, tiny.text))
    loaded = load_sd(path)
    assert loaded.config == TINY and loaded.prediction_type == "epsilon" and not loaded.used_ema
    assert load_sd(path, prediction_type="v_prediction").prediction_type == "v_prediction"
    ids = loaded.text.tokenize(["a cat"])
    with torch.no_grad():
        assert torch.equal(loaded.text(ids).tokens, tiny.text(ids).tokens)


def test_missing_unet_key_is_named(tiny, tmp_path):
    state = to_compvis(tiny.unet, tiny.vae, tiny.text)
    gone = UNET_PREFIX + "output_blocks.2.1.proj_out.weight"
    del state[gone]
    with pytest.raises(CtxdiffError, match=gone.replace(".", r"\.")):
        load_sd(_compvis_ckpt(tmp_path / "broken.ckpt", state))


def test_tokenize_pads_after_end_of_text_and_pools_the_end_of_text_feature(tiny):
    ids = tiny.text.tokenize(["a cat", "a red square above a blue circle"])
    eot = (ids == 49407).int().argmax(dim=-1)
    assert ids[0, 0] == 49406 and ids[0, eot[0] + 1:].eq(49407).all()  # SD 1.x pads with end-of-text
    with torch.no_grad():
        cond = tiny.text(ids)
    assert cond.mask.sum(dim=-1).tolist() == (eot + 1).tolist()
    assert torch.equal(cond.pooled, cond.tokens[torch.arange(2), eot])


def _fake_unet(output: torch.Tensor, seen: dict):
    def unet(x, tau, context):
        seen.update(x=x, tau=tau)
        return output
    return unet


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_predictor_inverts_eq1_exactly_at_paper_steps_1_mid_and_T(prediction_type):
    """x_t = sqrt(abar) x0 + k r + sqrt(1 - abar) eps (Eq. 1); the U-Net sees x_t, bias included, and an
    output equal to the effective noise eps' = (x_t - sqrt(abar) x0) / sqrt(1 - abar) (or its v) gives x0."""
    abar_all = SchedulerInfo().alphas_cumprod()
    t = torch.tensor([1, 500, 1000])
    g = torch.Generator().manual_seed(0)
    x0, eps, r = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    abar = abar_all[t].view(-1, 1, 1, 1)
    k = abar.sqrt() * (1 - abar.sqrt())
    x_t = abar.sqrt() * x0 + k * r + (1 - abar).sqrt() * eps
    effective = eps + k * r / (1 - abar).sqrt()
    output = effective if prediction_type == "epsilon" else abar.sqrt() * effective - (1 - abar).sqrt() * x0
    seen = {}
    predictor = as_x0_predictor(_fake_unet(output, seen), abar_all, prediction_type)
    cond = TextCondition(torch.zeros(3, 77, 8), torch.ones(3, 77, dtype=torch.bool), torch.zeros(3, 8))
    x0_hat = predictor(x_t, cond, t)
    assert (x0_hat - x0).abs().max() < 1e-10
    assert seen["tau"].tolist() == [0, 499, 999]  # diffusers timestep = paper step - 1
    assert torch.equal(seen["x"], x_t)  # the U-Net sees the contextual x_t itself


def test_x0_predictor_refuses_step_zero_and_unindexed_schedules():
    abar = SchedulerInfo().alphas_cumprod()
    predictor = as_x0_predictor(lambda x, tau, c: x, abar, "epsilon")
    with pytest.raises(ValueError, match="1..1000"):
        predictor(torch.zeros(1, 4, 2, 2), torch.zeros(1, 1, 8), 0)
    with pytest.raises(ValueError, match="paper-indexed"):
        as_x0_predictor(lambda x, tau, c: x, abar[1:], "epsilon")
