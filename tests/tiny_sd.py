"""Tiny random Stable-Diffusion-shaped models for tests (seconds on a CPU): U-Net latents 8x8 ->
16x16 images (the VAE halves once); text width 64."""

import torch

from ctxdiff.models.latent import (LatentModels, LatentSDConfig, LatentTextConfig, LatentTextEncoder, LatentUNet,
                                   LatentUNetConfig, LatentVAE, LatentVAEConfig, SchedulerInfo)

TINY_SD = LatentSDConfig(
    LatentUNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                     num_attention_heads=8, cross_attention_dim=64, sample_size=8),
    LatentVAEConfig(block_out_channels=(32, 32), layers_per_block=1),
    LatentTextConfig(width=64, layers=2, heads=1, intermediate_size=128))


def tiny_sd_models(seed: int, config: LatentSDConfig = TINY_SD, prediction_type: str = "epsilon") -> LatentModels:
    torch.manual_seed(seed)
    return LatentModels(LatentUNet(config.unet).eval(), LatentVAE(config.vae).eval(),
                        LatentTextEncoder(config.text).eval(), config, prediction_type, SchedulerInfo())


# --------------------------------------------------------------------------- files as users have them
# Tiny random diffusers/transformers models and the single-file layouts tools write from them
# (tests/test_sd_files.py). diffusers and transformers are imported only when these are called.

TEXT_WIDTH = 64  # one 64-channel head: SD's rule for text heads, so shapes alone give the architecture
DIFFUSERS_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=TEXT_WIDTH, sample_size=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
UNET_FLAVOURS = {"v1": dict(attention_head_dim=8, use_linear_projection=False),             # 8 heads, 1x1 convs
                 "v2": dict(attention_head_dim=(1, 1), use_linear_projection=True)}         # 64 channels per head
TEXT_ACT = {"v1": "quick_gelu", "v2": "gelu"}
DIFFUSERS_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised outputs and unit norms would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module.eval()


def clip_text_model(flavour: str, layers: int, seed: int = 2):
    """A random transformers CLIPTextModel: OpenAI-CLIP-like (v1, quick_gelu) or OpenCLIP-like (v2, gelu)."""
    import transformers
    config = transformers.CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                                         num_hidden_layers=layers, num_attention_heads=TEXT_WIDTH // 64,
                                         hidden_act=TEXT_ACT[flavour])
    return randomize(transformers.CLIPTextModel(config), seed)


def diffusers_models(flavour: str, seed: int = 0) -> dict:
    """A random diffusers U-Net and VAE of SD 1.x (v1) or SD 2.x (v2) shape."""
    import diffusers
    unet = randomize(diffusers.UNet2DConditionModel(**DIFFUSERS_UNET, **UNET_FLAVOURS[flavour]), seed)
    return dict(unet=unet, vae=randomize(diffusers.AutoencoderKL(**DIFFUSERS_VAE), seed + 1))


def write_diffusers_folder(folder, unet, vae, text, scheduler: dict | None = None, weights: bool = True):
    """A diffusers SD folder (configs only with weights=False: the `config=` diffusers' single-file loader reads)."""
    import json
    from pathlib import Path
    folder = Path(folder)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        if weights:
            model.save_pretrained(folder / name)
        elif hasattr(model, "save_config"):  # diffusers
            model.save_config(folder / name)
        else:  # transformers
            model.config.save_pretrained(folder / name)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        scheduler or {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "num_train_timesteps": 1000}))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder


def unet_vae_compvis(unet, vae) -> dict[str, torch.Tensor]:
    """The U-Net and VAE of diffusers models in CompVis names (ctxdiff's map, checked against diffusers' own
    converter in test_latent_parity), as contiguous copies."""
    from ctxdiff.models.latent.convert import UNET_PREFIX, VAE_PREFIX, compvis_names, unet_module_map, vae_module_map
    from ctxdiff.models.latent.unet import LatentUNetConfig
    from ctxdiff.models.latent.vae import LatentVAEConfig
    out = {}
    for model, config, module_map, prefix in (
            (unet, LatentUNetConfig.from_diffusers(dict(unet.config)), unet_module_map, UNET_PREFIX),
            (vae, LatentVAEConfig.from_diffusers(dict(vae.config)), vae_module_map, VAE_PREFIX)):
        state = model.state_dict()
        names = compvis_names(state, module_map(config))
        for key, value in state.items():
            conv = prefix == VAE_PREFIX and ".mid_block.attentions." in key and ".group_norm." not in key and (
                key.endswith(".weight"))
            out[prefix + names[key]] = (value[:, :, None, None] if conv else value).clone().contiguous()
    return out


def flat_text_state(text) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights without `text_model.` (transformers >= 5.6 saves them so; older ones with it)."""
    return {k.removeprefix("text_model."): v.clone().contiguous() for k, v in text.state_dict().items()
            if not k.endswith("position_ids")}


def sd1_text_keys(text, text_model: bool = True) -> dict[str, torch.Tensor]:
    """SD 1.x text as diffusers' conversion script writes it: `cond_stage_model.transformer.` + the
    transformers keys, which carry `text_model.` under transformers < 5.6 and not under later ones."""
    inner = "text_model." if text_model else ""
    return {f"cond_stage_model.transformer.{inner}{k}": v for k, v in flat_text_state(text).items()}


_OPENCLIP_RENAMES = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj"), ("self_attn", "attn"))


def openclip_text_keys(text, *, whole_model: bool, seed: int = 7) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower under `cond_stage_model.model.` (fused attn.in_proj).

    whole_model=False: as diffusers' conversion script writes a diffusers folder's (its v2 branch, under
    transformers < 5.6: the blocks it has, and text_model's position-id buffer left under
    `transformer.text_model.`). whole_model=True: as SD's own files store FrozenOpenCLIPEmbedder's model,
    with its text_projection and logit_scale.
    """
    p = "cond_stage_model.model."
    flat = flat_text_state(text)
    out = {p + "token_embedding.weight": flat.pop("embeddings.token_embedding.weight"),
           p + "positional_embedding": flat.pop("embeddings.position_embedding.weight"),
           p + "ln_final.weight": flat.pop("final_layer_norm.weight"),
           p + "ln_final.bias": flat.pop("final_layer_norm.bias")}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name = key.replace("encoder.layers.", "transformer.resblocks.")
        for ours, theirs in _OPENCLIP_RENAMES:
            name = name.replace(ours, theirs)
        head, sep, kind = name.rpartition("_proj.")
        if sep and head[-1] in "qkv" and head.endswith((".attn.q", ".attn.k", ".attn.v")):
            fused.setdefault(f"{head[:-1]}in_proj_{kind}", {})[head[-1]] = value
        else:
            out[p + name] = value
    out.update({p + name: torch.cat([parts[c] for c in "qkv"]) for name, parts in fused.items()})
    width = out[p + "token_embedding.weight"].shape[1]
    if whole_model:
        g = torch.Generator().manual_seed(seed)
        out[p + "text_projection"] = torch.randn(width, width, generator=g) / width ** 0.5
        out[p + "logit_scale"] = torch.tensor(4.6052)
    else:
        positions = out[p + "positional_embedding"].shape[0]
        out[p + "transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def ldm_schedule_buffers(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000,
                         dtype: torch.dtype = torch.float32, alphas_cumprod=None) -> dict[str, torch.Tensor]:
    """The schedule buffers CompVis' LatentDiffusion.register_schedule stores (its "linear" is diffusers'
    scaled_linear), computed in float64 and stored in `dtype`; `alphas_cumprod` [T] gives any schedule."""
    if alphas_cumprod is None:
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, dim=0)
    else:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    buffers = {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": prev,
               "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
               "posterior_variance": betas * (1 - prev) / (1 - abar).clamp(min=1e-20)}
    return {k: v.to(dtype) for k, v in buffers.items()}
