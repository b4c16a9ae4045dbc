"""Stable Diffusion single files as users have them (issue 23), each read as diffusers reads it.

Tiny random diffusers/transformers models are written in the layouts tools write: SD 1.x text
with and without `text_model.`, SD 2.x OpenCLIP towers of 24 blocks (SD's own files) and of 23
(diffusers' conversion script, from a diffusers folder), files with their own noise schedule
(Lightning .ckpt pickles: tests/test_safe_pickle.py). Where diffusers' single-file loader reads
the file (offline, given the configs) our models are compared with its to 1e-5; otherwise with the
models the file was written from. Files of other architectures are named in one line.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import safetensors.torch
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.loaders.single_file_utils import (  # noqa: E402
    create_diffusers_clip_model_from_ldm, load_single_file_checkpoint,
)
from tiny_sd import (  # noqa: E402
    DIFFUSERS_VAE, clip_text_model, diffusers_models, flat_text_state, ldm_schedule_buffers, openclip_text_keys,
    sd1_text_keys, unet_vae_compvis, write_diffusers_folder,
)

from ctxdiff.errors import CtxdiffError  # noqa: E402
from ctxdiff.models.latent import (  # noqa: E402
    LatentTextConfig, LatentTextEncoder, SchedulerInfo, as_x0_predictor, load_sd, save_compvis, tokenize,
)
from ctxdiff.models.latent.convert import (  # noqa: E402
    OPENCLIP_PREFIX, UNET_PREFIX, compvis_names, detect_text_config, normalize_text_keys, openclip_layer,
    openclip_module_map,
)
from ctxdiff.models.latent.loader import NonStandardScheduleWarning  # noqa: E402

TOL = 1e-5
PROMPTS = ["a red square above a blue circle", "an astronaut riding a horse, oil painting"]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _save(path, state: dict[str, torch.Tensor]):
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _without_layer(text, layer: int):
    """A CLIPTextModel with the blocks of `text` before `layer`: what diffusers' SD 2.x text_encoder/ holds."""
    config = transformers.CLIPTextConfig(**{**text.config.to_dict(), "num_hidden_layers": layer})
    cut = transformers.CLIPTextModel(config).eval()
    state = {k: v for k, v in text.state_dict().items() if f"layers.{layer}." not in k}
    cut.load_state_dict(state)
    return cut


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    models = diffusers_models("v1")
    text = clip_text_model("v1", 3)
    folder = write_diffusers_folder(root / "model", models["unet"], models["vae"], text)
    return dict(root=root, folder=folder, text=text, unet_vae=unet_vae_compvis(models["unet"], models["vae"]),
                **models)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """OpenCLIP-like text: a 24-block tower and the 23 blocks of it a diffusers folder keeps."""
    root = tmp_path_factory.mktemp("v2")
    models = diffusers_models("v2")
    text24 = clip_text_model("v2", 24)
    text23 = _without_layer(text24, 23)
    folder = write_diffusers_folder(root / "model", models["unet"], models["vae"], text23)
    return dict(root=root, folder=folder, text24=text24, text23=text23,
                unet_vae=unet_vae_compvis(models["unet"], models["vae"]), **models)


def _diffusers_reads(path, config_folder):
    """diffusers' single-file loader on `path`, offline, with the configs of `config_folder`."""
    kwargs = dict(config=str(config_folder), local_files_only=True)
    unet = diffusers.UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kwargs).eval()
    vae = diffusers.AutoencoderKL.from_single_file(str(path), subfolder="vae", **kwargs).eval()
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    text = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, checkpoint, subfolder="text_encoder",
                                                **kwargs).eval()
    return unet, vae, text


def _text_errors(ours, text) -> dict[str, float]:
    ids = tokenize(PROMPTS, ours.config.text.pad_token_id)
    with torch.no_grad():
        mine, ref = ours.text(ids), text(ids)
    return dict(tokens=_err(mine.tokens, ref.last_hidden_state), pooled=_err(mine.pooled, ref.pooler_output))


def _model_errors(ours, unet, vae, text) -> dict[str, float]:
    g = torch.Generator().manual_seed(3)
    latents, tau = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 999])
    context, image = torch.randn(2, 77, 64, generator=g), torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        errors = dict(unet=_err(ours.unet(latents, tau, context), unet(latents, tau, context).sample),
                      decode=_err(ours.vae.decode(latents[:1]), vae.decode(latents[:1]).sample),
                      encode=_err(ours.vae.encode(image).mean, vae.encode(image).latent_dist.mean))
    return {**errors, **_text_errors(ours, text)}


def _assert_within(errors: dict[str, float], tol: float = TOL):
    assert max(errors.values()) <= tol, errors


# --------------------------------------------------------------------------- SD 1.x text keys


def test_sd1_file_matches_diffusers_single_file_loader(v1, tmp_path):
    path = _save(tmp_path / "sd1.safetensors", {**v1["unet_vae"], **sd1_text_keys(v1["text"])})
    _assert_within(_model_errors(load_sd(path), *_diffusers_reads(path, v1["folder"])))


def test_sd1_text_keys_without_text_model_are_read_as_a1111_reads_them(v1, tmp_path):
    """cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.*: diffusers' own loader cannot read
    these (it looks for text_model.); they give the text encoder they were written from, and the very models
    of the same file with text_model."""
    short = sd1_text_keys(v1["text"], text_model=False)
    assert not any(".text_model." in k for k in short)
    ours = load_sd(_save(tmp_path / "short.safetensors", {**v1["unet_vae"], **short}))
    _assert_within(_text_errors(ours, v1["text"]))
    full = load_sd(_save(tmp_path / "full.safetensors", {**v1["unet_vae"], **sd1_text_keys(v1["text"])}))
    assert ours.config == full.config
    for part in ("unet", "vae", "text"):
        a, b = getattr(ours, part).state_dict(), getattr(full, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- SD 2.x OpenCLIP towers


def test_sd2_file_with_24_openclip_blocks_runs_23_as_diffusers_does(v2, tmp_path):
    """SD's own layout (the whole OpenCLIP tower, text_projection included): SD conditions on block 23."""
    path = _save(tmp_path / "sd2.safetensors",
                 {**v2["unet_vae"], **openclip_text_keys(v2["text24"], whole_model=True)})
    ours = load_sd(path, prediction_type="v_prediction")
    assert (ours.config.text.layers, ours.config.text.layer) == (24, "penultimate")
    _assert_within(_model_errors(ours, *_diffusers_reads(path, v2["folder"])))
    _assert_within(_text_errors(ours, v2["text23"]))


def test_sd2_file_with_23_openclip_blocks_runs_all_23_as_diffusers_does(v2, tmp_path):
    """What diffusers' conversion script writes from a diffusers folder: 23 blocks, no projection. Taking the
    penultimate of those (22 blocks, as before) is far off."""
    path = _save(tmp_path / "converted.safetensors",
                 {**v2["unet_vae"], **openclip_text_keys(v2["text23"], whole_model=False)})
    ours = load_sd(path, prediction_type="v_prediction")
    assert (ours.config.text.layers, ours.config.text.layer) == (23, "last")
    _assert_within(_model_errors(ours, *_diffusers_reads(path, v2["folder"])))
    _assert_within(_text_errors(ours, v2["text23"]))
    ids = tokenize(PROMPTS, 0)
    with torch.no_grad():
        hidden = v2["text23"](ids, output_hidden_states=True).hidden_states[-2]
        assert _err(ours.text(ids).tokens, v2["text23"].final_layer_norm(hidden)) > 0.1


@pytest.mark.parametrize("blocks, whole_model, layer", [(3, True, "penultimate"), (3, False, "last")])
def test_openclip_towers_of_other_depths_are_told_by_their_projection(blocks, whole_model, layer, tmp_path, v2):
    """Not ViT-H's depth: a whole OpenCLIP model (SD's files carry its text_projection) runs all but its last
    block, a tower without one runs all it has; each as the CLIPTextModel it was written from says."""
    text = clip_text_model("v2", blocks, seed=11)
    path = _save(tmp_path / "m.safetensors", {**v2["unet_vae"], **openclip_text_keys(text, whole_model=whole_model)})
    ours = load_sd(path, prediction_type="v_prediction")
    assert ours.config.text.layer == layer
    reference = _without_layer(text, blocks - 1) if layer == "penultimate" else text
    _assert_within(_text_errors(ours, reference))


def _text_state_on_meta(config: LatentTextConfig, names: str, projection: bool) -> dict[str, torch.Tensor]:
    """A full-size text tower's keys and shapes (meta tensors: no memory) in transformers or open_clip names."""
    with torch.device("meta"):
        state = LatentTextEncoder(config).state_dict()
    if names == "transformers":
        return {"cond_stage_model.transformer." + k: v for k, v in state.items()}
    names = compvis_names(state, openclip_module_map(config))
    out = {OPENCLIP_PREFIX + names[k]: v for k, v in state.items()}
    if projection:
        out[OPENCLIP_PREFIX + "text_projection"] = torch.empty(config.width, config.width, device="meta")
    return out


@pytest.mark.parametrize("stored, names, projection, layer", [
    (24, "open_clip", True, "penultimate"),    # SD 2.x's own files
    (24, "open_clip", False, "penultimate"),   # ... with the projection pruned
    (23, "open_clip", False, "last"),          # diffusers' conversion script (transformers < 5.6)
    (23, "open_clip", True, "last"),           # ... and a tool that adds a dummy projection
    (23, "transformers", False, "last"),       # the script under transformers >= 5.6: no text_model. either
])
def test_full_size_sd2_text_towers_run_23_blocks_however_stored(stored, names, projection, layer):
    config = LatentTextConfig(width=1024, layers=stored, heads=16, intermediate_size=4096, act="gelu",
                              layer="penultimate" if stored == 24 else "last", pad_token_id=0)
    state = _text_state_on_meta(config, names, projection)
    detected = detect_text_config(normalize_text_keys(state))
    assert detected == config and detected.layer == layer
    assert stored - (detected.layer == "penultimate") == 23
    assert openclip_layer(24, False) == "penultimate" and openclip_layer(23, True) == "last"


# --------------------------------------------------------------------------- the file's own schedule


def _v1_file(v1, path, **buffers):
    return _save(path, {**v1["unet_vae"], **sd1_text_keys(v1["text"]), **buffers})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_standard_schedule_buffers_give_exactly_the_standard_schedule_without_a_warning(v1, tmp_path, dtype):
    path = _v1_file(v1, tmp_path / "sd.safetensors", **ldm_schedule_buffers(dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonStandardScheduleWarning)
        ours = load_sd(path)
    assert ours.scheduler == SchedulerInfo()


def test_fine_tune_with_another_schedule_samples_with_its_own(v1, tmp_path):
    """A CompVis file trained with linear_start 0.001, linear_end 0.02: its alphas_cumprod, as diffusers'
    scheduler of those betas computes it, feeds the x0 predictor; a warning names it."""
    buffers = ldm_schedule_buffers(0.001, 0.02)
    path = _v1_file(v1, tmp_path / "fine-tune.safetensors", **buffers)
    with pytest.warns(NonStandardScheduleWarning, match=r"not Stable Diffusion's standard one .*scaled_linear "
                                                        r"0\.001\.\.0\.02, T = 1000"):
        ours = load_sd(path)
    abar = ours.scheduler.alphas_cumprod()
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.02).alphas_cumprod
    assert _err(abar[1:], reference) <= TOL and _err(abar[1:], buffers["alphas_cumprod"]) <= 1e-7
    assert _err(abar, SchedulerInfo().alphas_cumprod()) > 1e-2  # the standard schedule would be far off
    assert ours.scheduler.beta_schedule == "scaled_linear"
    assert torch.equal(as_x0_predictor(ours.unet, abar, ours.prediction_type).abar, abar)


def test_schedule_of_no_standard_family_is_used_exactly(v1, tmp_path):
    steps = torch.arange(1001, dtype=torch.float64) / 1000
    cosine = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - cosine[1:] / cosine[:-1]).clamp(max=0.999)  # Nichol & Dhariwal's cosine schedule
    buffers = ldm_schedule_buffers(alphas_cumprod=torch.cumprod(1 - betas, 0))
    with pytest.warns(NonStandardScheduleWarning, match="no standard family"):
        ours = load_sd(_v1_file(v1, tmp_path / "cosine.safetensors", **buffers))
    assert ours.scheduler.beta_schedule == "custom"
    assert _err(ours.scheduler.alphas_cumprod()[1:], buffers["alphas_cumprod"]) <= 1e-12


def _folder_with_scheduler(v1, tmp_path, config: dict):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("unet", "vae", "text_encoder", "model_index.json"):
        (folder / name).symlink_to(v1["folder"] / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", **config}))
    return folder


_GAMMA = [float(b) for b in torch.linspace(1e-4, 0.03, 800) ** 1.5]
_SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear T=500": dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.015,
                                num_train_timesteps=500),
    "trained_betas": dict(trained_betas=_GAMMA, num_train_timesteps=len(_GAMMA)),
    "zero terminal SNR": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


@pytest.mark.parametrize("name", sorted(_SCHEDULES))
def test_diffusers_folder_schedule_is_the_one_diffusers_builds(name, v1, tmp_path):
    folder = _folder_with_scheduler(v1, tmp_path, _SCHEDULES[name])
    with pytest.warns(NonStandardScheduleWarning):
        ours = load_sd(folder)
    reference = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod
    abar = ours.scheduler.alphas_cumprod()
    assert abar.shape == (len(reference) + 1,) and abar[0] == 1
    assert _err(abar[1:], reference) <= TOL
    assert _err(abar[1:len(reference) + 1], SchedulerInfo().alphas_cumprod()[1:len(reference) + 1]) > 1e-3


def test_zero_snr_schedule_with_an_epsilon_unet_is_refused(v1, tmp_path):
    config = {**_SCHEDULES["zero terminal SNR"], "prediction_type": "epsilon"}
    with pytest.raises(CtxdiffError, match=r"zero SNR .*prediction_type='v_prediction'"):
        load_sd(_folder_with_scheduler(v1, tmp_path, config))


def test_own_schedule_round_trips_through_save_compvis(v1, tmp_path):
    with pytest.warns(NonStandardScheduleWarning):
        ours = load_sd(_folder_with_scheduler(v1, tmp_path, _SCHEDULES["trained_betas"]))
        again = load_sd(save_compvis(tmp_path / "saved.safetensors", ours))
    assert again.scheduler == ours.scheduler and again.scheduler.trained_betas is not None
    assert torch.equal(again.scheduler.alphas_cumprod(), ours.scheduler.alphas_cumprod())


# --------------------------------------------------------------------------- other files, named


def _z(*shape):
    return torch.zeros(*shape)


def _other_files(v1) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    vae = diffusers.AutoencoderKL(**DIFFUSERS_VAE).state_dict()
    compvis_vae = {k: v for k, v in v1["unet_vae"].items() if k.startswith("first_stage_model.")}
    unet_only = {k: v for k, v in v1["unet_vae"].items() if k.startswith(UNET_PREFIX)}
    return {
        "SDXL": ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": _z(2),
                  UNET_PREFIX + "input_blocks.0.0.weight": _z(2, 4, 3, 3)}, "not supported: detected SDXL"),
        "SD3": ({UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias": _z(2),
                 "first_stage_model.encoder.conv_in.weight": _z(2, 3, 3, 3),
                 "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": _z(77, 8)},
                "not supported: detected Stable Diffusion 3"),
        "Flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": _z(2)}, "not supported: detected Flux"),
        "ControlNet": ({"control_model.input_hint_block.0.weight": _z(2, 3, 3, 3),
                        "control_model.time_embed.0.weight": _z(2, 2)}, "not supported: detected a ControlNet"),
        "LoRA (kohya)": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _z(4, 8),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _z(8, 4),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": _z(())}, "this is a LoRA"),
        "LoRA (diffusers)": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": _z(4, 8),
                              "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": _z(8, 4)}, "this is a LoRA"),
        "VAE (diffusers)": (vae, "this is a VAE-only checkpoint"),
        "VAE (CompVis)": (compvis_vae, "this is a VAE-only checkpoint"),
        "text encoder (transformers)": (flat_text_state(v1["text"]), "this is a text encoder alone"),
        "text encoder (SD 1.x keys)": (sd1_text_keys(v1["text"]), "this is a text encoder alone"),
        "text encoder (open_clip)": (openclip_text_keys(v1["text"], whole_model=True), "this is a text encoder alone"),
        "U-Net (diffusers)": (v1["unet"].state_dict(), "this is a U-Net alone"),
        "U-Net without VAE and text": (unet_only, "this is a U-Net without its VAE and text encoder"),
        "embedding": ({"emb_params": _z(2, 768)}, "this is a textual-inversion embedding"),
    }


def test_files_of_other_architectures_are_named_in_one_line(v1, tmp_path):
    for name, (state, phrase) in _other_files(v1).items():
        path = _save(tmp_path / "other.safetensors", state)
        with pytest.raises(CtxdiffError) as info:
            load_sd(path)
        message = str(info.value)
        assert phrase in message and "\n" not in message and message.startswith(str(path)), (name, message)


def test_a_lora_given_to_generate_exits_1_with_one_line(v1, tmp_path, monkeypatch, capsys):
    from ctxdiff.cli import main
    state, phrase = _other_files(v1)["LoRA (kohya)"]
    path = _save(tmp_path / "style.safetensors", state)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", str(path), "a cat"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and phrase in err


def test_transformer_based_diffusers_folder_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(CtxdiffError, match="not supported: detected a transformer-based model "
                                           r"\(StableDiffusion3Pipeline"):
        load_sd(tmp_path)
