"""Key maps between ctxdiff's latent models and the original CompVis single-file layout.

Our U-Net and VAE use diffusers' parameter names and the text encoder transformers'
CLIPTextModel names, so diffusers folders load as they are. A CompVis checkpoint stores

    model.diffusion_model.*                   the U-Net (input_blocks / middle_block / output_blocks)
    model_ema.*                               its EMA copy, dots removed
                                              ("model_ema.diffusion_modelinput_blocks00weight")
    first_stage_model.*                       the VAE (encoder.down.N.block.M, mid.attn_1 with 1x1-conv q/k/v)
    cond_stage_model.transformer.text_model.* SD 1.x text (transformers names; older tools, and diffusers'
                                              conversion script under transformers >= 5.6, leave out
                                              `text_model.`: `normalize_text_keys` puts it back)
    cond_stage_model.model.*                  SD 2.x text (open_clip names, fused attn.in_proj): the full
                                              24-block tower (SD's own files) or the 23 blocks SD uses
                                              (written from a diffusers folder); see `openclip_layer`

The maps are generated from a config by looping over levels: `*_module_map` pairs each of our
module prefixes with its CompVis prefix and the renames inside that module; `compvis_names`
applies such a map to every parameter of a model. The same tables convert both ways.
"""

from __future__ import annotations

import torch

from ctxdiff.errors import CtxdiffError
from ctxdiff.models.latent.text import LatentTextConfig, LatentTextEncoder
from ctxdiff.models.latent.unet import LatentUNet, LatentUNetConfig
from ctxdiff.models.latent.vae import LatentVAE, LatentVAEConfig

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
# In SD checkpoints but not part of our models: CLIP's position-id buffer (also where diffusers' conversion
# script leaves it in an SD 2.x file), OpenCLIP's projection and temperature.
IGNORED_TEXT_KEYS = {CLIP_PREFIX + "embeddings.position_ids", OPENCLIP_PREFIX + "text_projection",
                     OPENCLIP_PREFIX + "logit_scale",
                     OPENCLIP_PREFIX + "transformer.text_model.embeddings.position_ids"}
_CLIP_SHORT_PREFIX = "cond_stage_model.transformer."
_CLIP_MODULES = ("embeddings.", "encoder.", "final_layer_norm.")
OPENCLIP_H_BLOCKS = 24  # OpenCLIP ViT-H/14's text tower; SD 2.x conditions on its 23rd block
OPENCLIP_H_WIDTH = 1024

ModuleMap = list[tuple[str, str, dict[str, str]]]

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn": "attn"}


def unet_module_map(config: LatentUNetConfig) -> ModuleMap:
    """Our U-Net modules -> CompVis `model.diffusion_model.` modules (without the prefix)."""
    n, per = len(config.block_out_channels), config.layers_per_block + 1
    m: ModuleMap = [("conv_in", "input_blocks.0.0", {}), ("time_embedding.linear_1", "time_embed.0", {}),
                    ("time_embedding.linear_2", "time_embed.2", {}), ("conv_norm_out", "out.0", {}),
                    ("conv_out", "out.2", {}), ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
                    ("mid_block.attentions.0", "middle_block.1", {}),
                    ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    for level in range(n):
        for j in range(config.layers_per_block):
            block = 1 + level * per + j
            m.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0", _UNET_RESNET))
            if config.attention_levels[level]:
                m.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{block}.1", {}))
        if level < n - 1:
            m.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{(level + 1) * per}.0.op", {}))
    for i in range(n):
        attention = config.attention_levels[n - 1 - i]
        for j in range(per):
            m.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * per + j}.0", _UNET_RESNET))
            if attention:
                m.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{i * per + j}.1", {}))
        if i < n - 1:
            upsampler = f"output_blocks.{i * per + per - 1}.{2 if attention else 1}.conv"
            m.append((f"up_blocks.{i}.upsamplers.0.conv", upsampler, {}))
    return m


def vae_module_map(config: LatentVAEConfig) -> ModuleMap:
    """Our VAE modules -> CompVis `first_stage_model.` modules (without the prefix)."""
    n = len(config.block_out_channels)
    m: ModuleMap = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        m += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_norm_out", f"{part}.norm_out", {}),
              (f"{part}.conv_out", f"{part}.conv_out", {}),
              (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
              (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
              (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)]
    for level in range(n):
        for j in range(config.layers_per_block):
            m.append((f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", _VAE_RESNET))
        if level < n - 1:
            m.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv", {}))
    for i in range(n):
        level = n - 1 - i  # CompVis numbers decoder levels from the highest resolution
        for j in range(config.layers_per_block + 1):
            m.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET))
        if i < n - 1:
            m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", {}))
    return m


def openclip_module_map(config: LatentTextConfig) -> ModuleMap:
    """Our text modules -> open_clip names (`cond_stage_model.model.`), q/k/v still unfused."""
    m: ModuleMap = [("embeddings.token_embedding", "token_embedding", {}),
                    ("embeddings.position_embedding.weight", "positional_embedding", {}),
                    ("final_layer_norm", "ln_final", {})]
    m += [(f"encoder.layers.{i}", f"transformer.resblocks.{i}", _OPENCLIP_LAYER) for i in range(config.layers)]
    return m


def compvis_names(keys, module_map: ModuleMap) -> dict[str, str]:
    """{our key: CompVis key} for every key, renaming its module prefix and the part inside it."""
    names = {}
    for key in keys:
        for ours, theirs, inner in module_map:
            if key == ours:
                names[key] = theirs
                break
            if key.startswith(ours + "."):
                rest = key[len(ours) + 1:]
                for a, b in inner.items():
                    if rest == a or rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                names[key] = f"{theirs}.{rest}"
                break
        else:
            raise KeyError(f"{key} has no CompVis name in the module map")
    return names


def model_keys(module_class, config) -> list[str]:
    """The parameter names of `module_class(config)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        return list(module_class(config).state_dict())


def _is_vae_conv_attention(key: str) -> bool:
    """VAE mid-block q/k/v/out weights: linear for us, 1x1 convs in CompVis files."""
    return ".mid_block.attentions." in key and ".group_norm." not in key and key.endswith(".weight")


def _take(state: dict[str, torch.Tensor], names: dict[str, str], prefix: str, what: str,
          ignored: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Our state dict from the `prefix` part of a CompVis state; missing or extra keys are named."""
    missing = sorted(prefix + theirs for theirs in names.values() if prefix + theirs not in state)
    wanted = {prefix + theirs for theirs in names.values()}
    unexpected = sorted(k for k in state if k.startswith(prefix) and k not in wanted and k not in ignored)
    if missing or unexpected:
        parts = ([f"{len(missing)} missing: {_listing(missing)}"] if missing else []) + (
            [f"{len(unexpected)} unexpected: {_listing(unexpected)}"] if unexpected else [])
        raise CtxdiffError(f"{what} weights do not fit the detected architecture ({'; '.join(parts)}); "
                           "pass an unmodified SD 1.x/2.x checkpoint")
    return {ours: state[prefix + theirs] for ours, theirs in names.items()}


def _listing(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------- CompVis -> ours


def unet_from_compvis(state: dict[str, torch.Tensor], config: LatentUNetConfig) -> dict[str, torch.Tensor]:
    names = compvis_names(model_keys(LatentUNet, config), unet_module_map(config))
    return _take(state, names, UNET_PREFIX, "U-Net")


def ema_key(key: str) -> str:
    """The EMA name of a `model.*` key: `model_ema.` + the rest without dots."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def vae_from_compvis(state: dict[str, torch.Tensor], config: LatentVAEConfig) -> dict[str, torch.Tensor]:
    names = compvis_names(model_keys(LatentVAE, config), vae_module_map(config))
    ours = _take(state, names, VAE_PREFIX, "VAE")
    return {k: v.flatten(1) if _is_vae_conv_attention(k) and v.ndim == 4 else v for k, v in ours.items()}


def text_from_compvis(state: dict[str, torch.Tensor], config: LatentTextConfig) -> dict[str, torch.Tensor]:
    """SD 1.x keys are ours under CLIP_PREFIX; SD 2.x open_clip keys get renamed and in_proj split."""
    keys = model_keys(LatentTextEncoder, config)
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return _take(state, {k: k for k in keys}, CLIP_PREFIX, "text encoder", IGNORED_TEXT_KEYS)
    state = _split_in_proj(state)
    return _take(state, compvis_names(keys, openclip_module_map(config)), OPENCLIP_PREFIX, "text encoder",
                 IGNORED_TEXT_KEYS)


def _split_in_proj(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's fused attn.in_proj_weight/bias -> attn.{q,k,v}_proj.weight/bias (a shallow copy)."""
    out = {}
    for key, value in state.items():
        head, sep, kind = key.rpartition(".in_proj_")
        if sep and key.startswith(OPENCLIP_PREFIX):
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{head}.{name}_proj.{kind}"] = part
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- ours -> CompVis


def to_compvis(unet: LatentUNet, vae: LatentVAE, text: LatentTextEncoder) -> dict[str, torch.Tensor]:
    """One CompVis-layout state dict for the three models (views of their tensors, detached).

    The text encoder is written the way CompVis SD reads it: quick_gelu (OpenAI CLIP) models in
    transformers names, taking the last layer; gelu (OpenCLIP) models in open_clip names, where
    SD 2.x takes the penultimate layer. An OpenCLIP model that uses its last layer (a diffusers
    SD 2.x folder, whose last OpenCLIP layer was dropped) gets an all-zero final block appended:
    SD's penultimate layer is then exactly this model's last one.
    """
    out = {}
    names = compvis_names(unet.state_dict(), unet_module_map(unet.config))
    out.update({UNET_PREFIX + names[k]: v for k, v in unet.state_dict().items()})
    names = compvis_names(vae.state_dict(), vae_module_map(vae.config))
    out.update({VAE_PREFIX + names[k]: v[:, :, None, None] if _is_vae_conv_attention(k) else v
                for k, v in vae.state_dict().items()})
    out.update(_text_to_compvis(text))
    return {k: v.detach() for k, v in out.items()}


def compvis_text_config(config: LatentTextConfig) -> LatentTextConfig:
    """The text config a CompVis file written by `to_compvis` holds (see there)."""
    if config.act == "gelu" and config.layer == "last":
        return LatentTextConfig(**{**config.to_dict(), "layers": config.layers + 1, "layer": "penultimate"})
    return config


def _text_to_compvis(text: LatentTextEncoder) -> dict[str, torch.Tensor]:
    config = text.config
    state = text.state_dict()
    if config.act != "gelu":
        if config.layer != "last":
            raise CtxdiffError("cannot write an OpenAI-CLIP (quick_gelu) text encoder that uses its penultimate "
                               "layer in CompVis layout: SD 1.x files always take the last layer")
        return {CLIP_PREFIX + k: v for k, v in state.items()}
    written = compvis_text_config(config)
    if written.layers > config.layers:
        last = f"encoder.layers.{config.layers - 1}."
        state = {**state, **{k.replace(last, f"encoder.layers.{config.layers}."): torch.zeros_like(v)
                             for k, v in state.items() if k.startswith(last)}}
    names = compvis_names(state, openclip_module_map(written))
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = OPENCLIP_PREFIX + names[key]
        head, sep, kind = name.rpartition("_proj.")
        if sep and head[-1] in "qkv" and head[:-1].endswith(".attn."):
            fused.setdefault(f"{head[:-1]}in_proj_{kind}", {})[head[-1]] = value
        else:
            out[name] = value
    out.update({name: torch.cat([parts[c] for c in "qkv"]) for name, parts in fused.items()})
    return out


# --------------------------------------------------------------------------- configs from shapes


def detect_unet_config(state: dict[str, torch.Tensor]) -> LatentUNetConfig:
    """The U-Net architecture of a CompVis state dict, read from its tensor shapes.

    Heads cannot be seen in shapes; SD's rule: 1x1-conv projections (SD 1.x) use 8 heads,
    linear projections (SD 2.x) use 64 channels per head.
    """
    p = UNET_PREFIX
    try:
        conv_in = state[p + "input_blocks.0.0.weight"]
        blocks = {int(k.split(".")[3]) for k in state if k.startswith(p + "input_blocks.")}
        downsamples = sum(f"{p}input_blocks.{b}.0.op.weight" in state for b in blocks)
        levels = downsamples + 1
        per_level, rest = divmod(len(blocks) - 1 - downsamples, levels)
        if rest or per_level < 1:
            raise KeyError("input_blocks")
        firsts = [1 + level * (per_level + 1) for level in range(levels)]
        chans = tuple(state[f"{p}input_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in firsts)
        attention = tuple(f"{p}input_blocks.{b}.1.proj_in.weight" in state for b in firsts)
        proj_in = next(state[f"{p}input_blocks.{b}.1.proj_in.weight"] for b, a in zip(firsts, attention) if a)
        context = next(v for k, v in state.items() if k.startswith(p) and k.endswith("attn2.to_k.weight"))
        out_channels = state[p + "out.2.weight"].shape[0]
    except (KeyError, StopIteration) as e:
        raise CtxdiffError(f"not a Stable Diffusion 1.x/2.x U-Net (no {e} found under {p}); "
                           "pass an SD 1.x or 2.x checkpoint") from e
    linear = proj_in.ndim == 2
    return LatentUNetConfig(
        in_channels=conv_in.shape[1], out_channels=out_channels, block_out_channels=chans,
        layers_per_block=per_level, attention_levels=attention,
        num_attention_heads=tuple(max(c // 64, 1) for c in chans) if linear else 8,
        cross_attention_dim=context.shape[1], use_linear_projection=linear)


def detect_vae_config(state: dict[str, torch.Tensor]) -> LatentVAEConfig:
    p = VAE_PREFIX
    try:
        levels = len({k.split(".")[3] for k in state if k.startswith(p + "encoder.down.")})
        layers = len({k.split(".")[5] for k in state if k.startswith(p + "encoder.down.0.block.")})
        chans = tuple(state[f"{p}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels))
        return LatentVAEConfig(in_channels=state[p + "encoder.conv_in.weight"].shape[1],
                               out_channels=state[p + "decoder.conv_out.weight"].shape[0], block_out_channels=chans,
                               layers_per_block=layers, latent_channels=state[p + "post_quant_conv.weight"].shape[0])
    except KeyError as e:
        raise CtxdiffError(f"the VAE is incomplete (no {e} found); pass an unmodified SD 1.x/2.x checkpoint") from e


def normalize_text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x text keys without `text_model.` (`cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.*`,
    from older tools and from diffusers' conversion script under transformers >= 5.6) put under CLIP_PREFIX, as
    AUTOMATIC1111 and kohya do; a state that has CLIP_PREFIX keys is returned as it is."""
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return state
    short = len(_CLIP_SHORT_PREFIX)
    return {CLIP_PREFIX + k[short:] if k.startswith(_CLIP_SHORT_PREFIX) and k[short:].startswith(_CLIP_MODULES)
            else k: v for k, v in state.items()}


def openclip_layer(blocks: int, has_projection: bool) -> str:
    """Which output of a stored OpenCLIP text tower conditions SD 2.x: "penultimate" or "last".

    SD 2.x uses the 23rd of ViT-H/14's 24 blocks. SD's own files store all 24 (kohya's converter pads
    to 24 too); diffusers' text_encoder/ stops at the 23rd, and its conversion script writes those 23.
    Either way 23 run. A tower of another depth (not ViT-H: test-sized models) is told by SD's mark of
    a whole OpenCLIP model, the text_projection its files carry.
    """
    if blocks == OPENCLIP_H_BLOCKS:
        return "penultimate"
    if blocks == OPENCLIP_H_BLOCKS - 1:
        return "last"
    return "penultimate" if has_projection else "last"


def detect_text_config(state: dict[str, torch.Tensor]) -> LatentTextConfig:
    """The text encoder of a CompVis state dict (text keys normalised by `normalize_text_keys`).

    transformers names: SD 1.x (OpenAI CLIP, quick_gelu, last layer), or, 1024 wide, SD 2.x's OpenCLIP
    ViT-H in those names (gelu, padded with 0; which layer as `openclip_layer`). open_clip names: SD 2.x
    (gelu, padded with 0, `openclip_layer`). CLIP text towers use 64 channels per head.
    """
    try:
        if any(k.startswith(CLIP_PREFIX) for k in state):
            p = CLIP_PREFIX
            tokens = state[p + "embeddings.token_embedding.weight"]
            layers = len({k.split(".")[5] for k in state if k.startswith(p + "encoder.layers.")})
            openclip = tokens.shape[1] == OPENCLIP_H_WIDTH
            return LatentTextConfig(width=tokens.shape[1], layers=layers, heads=tokens.shape[1] // 64,
                                    intermediate_size=state[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                                    vocab_size=tokens.shape[0],
                                    max_positions=state[p + "embeddings.position_embedding.weight"].shape[0],
                                    **(dict(act="gelu", layer=openclip_layer(layers, False), pad_token_id=0)
                                       if openclip else {}))
        p = OPENCLIP_PREFIX
        tokens = state[p + "token_embedding.weight"]
        layers = len({k.split(".")[4] for k in state if k.startswith(p + "transformer.resblocks.")})
        return LatentTextConfig(width=tokens.shape[1], layers=layers, heads=tokens.shape[1] // 64,
                                intermediate_size=state[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                                vocab_size=tokens.shape[0], max_positions=state[p + "positional_embedding"].shape[0],
                                act="gelu", layer=openclip_layer(layers, p + "text_projection" in state),
                                pad_token_id=0)
    except KeyError as e:
        text_keys = sorted(k for k in state if k.startswith(TEXT_PREFIX))
        if not text_keys:
            raise CtxdiffError(f"no text encoder in it (no {TEXT_PREFIX}* keys); pass a full Stable Diffusion "
                               "checkpoint") from e
        raise CtxdiffError(f"the text encoder is in a layout ctxdiff does not know (missing {e}; it has e.g. "
                           f"{text_keys[0]}; expected {CLIP_PREFIX}* or {OPENCLIP_PREFIX}*); pass an SD 1.x/2.x "
                           "checkpoint") from e
