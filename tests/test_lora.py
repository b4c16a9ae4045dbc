"""LoRA files merge into our SD models as diffusers' `load_lora_weights` + `fuse_lora` merge them (to 1e-5).

Random LoRAs on a tiny random SD 1.x-shaped model (tests/tiny_sd.py), written in the kohya/A1111 layout and in the
diffusers/PEFT layout: attention (self and cross), feed-forward, 1x1-conv projections, 3x3 resnet and downsampler
convolutions (kohya's LoCon), the time-embedding projection, and the text encoder's attention and MLP.
"""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch

from ctxdiff.errors import CtxdiffError
from ctxdiff.models.latent import load_sd
from ctxdiff.models.latent.lora import merge_lora, merge_loras, parse_lora_spec, read_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_sd import clip_text_model, diffusers_models, write_diffusers_folder  # noqa: E402

TOL = 1e-5
RANK = 4
UNET_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",                 # a 1x1 convolution (SD 1.x)
    "down_blocks.0.resnets.0.conv1",                      # 3x3 (LoCon)
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.resnets.0.conv_shortcut",                # 1x1
]
TEXT_MLP = ["encoder.layers.0.mlp.fc1", "encoder.layers.1.mlp.fc2"]
TEXT_ATTENTION = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny random diffusers models, the folder they make, and a loader of fresh copies of both sides."""
    models = diffusers_models("v1")
    text = clip_text_model("v1", layers=2)
    folder = write_diffusers_folder(tmp_path_factory.mktemp("sd") / "tiny", models["unet"], models["vae"], text)
    return dict(unet=models["unet"], vae=models["vae"], text=text, folder=folder)


def _diffusers_pipe(base):
    return diffusers.StableDiffusionPipeline(
        vae=base["vae"], text_encoder=copy.deepcopy(base["text"]), tokenizer=None, unet=copy.deepcopy(base["unet"]),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _random_lora(base, unet_names, text_names, seed, alpha=None):
    """{("unet"|"text", module): (down, up, alpha)}: random low-rank factors of the shapes each layout stores,
    `alpha` for all (as kohya writes one network alpha) or a random one per module (None)."""
    g = torch.Generator().manual_seed(seed)
    weights = {("unet", n): base["unet"].get_submodule(n).weight for n in unet_names}
    weights.update({("text", n): _text_module(base["text"], n).weight for n in text_names})
    out = {}
    for key, w in weights.items():
        if w.ndim == 4:
            down, up = torch.randn(RANK, *w.shape[1:], generator=g), torch.randn(w.shape[0], RANK, 1, 1, generator=g)
        else:
            down, up = torch.randn(RANK, w.shape[1], generator=g), torch.randn(w.shape[0], RANK, generator=g)
        a = float(torch.randint(1, 9, (1,), generator=g)) if alpha is None else alpha
        out[key] = (down / down[0].numel() ** 0.5, up * 0.1, a)
    return out


def _text_module(text, name):
    """transformers >= 5.6 has no `text_model.` level; older versions do."""
    return text.get_submodule(name) if not hasattr(text, "text_model") else text.text_model.get_submodule(name)


def write_kohya(path, lora, compvis_names=None):
    state = {}
    for (part, name), (down, up, alpha) in lora.items():
        name = (compvis_names or {}).get(name, name)
        key = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + name.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    safetensors.torch.save_file(state, str(path))
    return path


def write_peft(path, lora, text_model_prefix=True):
    """diffusers' save_lora_weights layout: lora_A/lora_B, alphas in `lora_adapter_metadata` (alpha_pattern)."""
    state, metadata = {}, {}
    for (part, name), (down, up, alpha) in lora.items():
        prefix = "unet" if part == "unet" else "text_encoder" + (".text_model" if text_model_prefix else "")
        state.update({f"{prefix}.{name}.lora_A.weight": down, f"{prefix}.{name}.lora_B.weight": up})
        config = "unet" if part == "unet" else "text_encoder"
        metadata.setdefault(f"{config}.r", RANK)
        metadata.setdefault(f"{config}.lora_alpha", RANK)
        metadata.setdefault(f"{config}.target_modules", []).append(name.split(".")[-1] if name[-1] != "0" else "0")
        metadata.setdefault(f"{config}.alpha_pattern", {})[name] = alpha
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt",
                                                           "lora_adapter_metadata": json.dumps(metadata)})
    return path


def _ours(base):
    return load_sd(base["folder"])


def _max_diff(ours, pipe) -> float:
    theirs = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
              **{f"text.{k.removeprefix('text_model.')}": v for k, v in pipe.text_encoder.state_dict().items()}}
    mine = {**{f"unet.{k}": v for k, v in ours.unet.state_dict().items()},
            **{f"text.{k}": v for k, v in ours.text.state_dict().items()}}
    return max((mine[k] - theirs[k]).abs().max().item() for k in mine)


def _changed(before, after) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _fuse(pipe, path, weight):
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=weight)
    pipe.unload_lora_weights()


def test_peft_layout_merge_equals_diffusers_fuse_lora(base, tmp_path):
    lora = _random_lora(base, UNET_TARGETS, TEXT_MLP + TEXT_ATTENTION, seed=1)
    path = write_peft(tmp_path / "peft.safetensors", lora)
    pipe, ours = _diffusers_pipe(base), _ours(base)
    before = copy.deepcopy(ours.unet.state_dict())
    _fuse(pipe, path, 0.7)
    merged = merge_lora(ours, path, 0.7)
    assert (merged.unet, merged.text) == (len(UNET_TARGETS), 4)
    assert _max_diff(ours, pipe) <= TOL
    assert _changed(before, ours.unet.state_dict()) == {f"{n}.weight" for n in UNET_TARGETS}


def test_kohya_layout_merge_equals_diffusers_fuse_lora(base, tmp_path):
    # diffusers 0.42 with transformers >= 5.6 drops kohya text *attention* LoRAs (it warns of unexpected keys), and
    # gives some modules another module's alpha when alphas differ; so the reference here has the text MLP only and
    # one alpha for the file, as kohya writes it. The next test ties per-module alphas and the text attention to the
    # PEFT layout, which diffusers reads right.
    lora = _random_lora(base, UNET_TARGETS, TEXT_MLP, seed=2, alpha=2.0)
    path = write_kohya(tmp_path / "kohya.safetensors", lora)
    pipe, ours = _diffusers_pipe(base), _ours(base)
    _fuse(pipe, path, 1.3)
    merged = merge_lora(ours, path, 1.3)
    assert read_lora(path).layout == "kohya" and (merged.unet, merged.text) == (len(UNET_TARGETS), 2)
    assert _max_diff(ours, pipe) <= TOL


def test_kohya_diffusers_and_compvis_names_and_peft_layout_give_one_model(base, tmp_path):
    from ctxdiff.models.latent.convert import compvis_names, unet_module_map
    lora = _random_lora(base, UNET_TARGETS, TEXT_MLP + TEXT_ATTENTION, seed=3)
    ours = _ours(base)
    names = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in compvis_names(
        [n + ".weight" for n in UNET_TARGETS], unet_module_map(ours.config.unet)).items()}
    files = [write_kohya(tmp_path / "a.safetensors", lora), write_kohya(tmp_path / "b.safetensors", lora, names),
             write_peft(tmp_path / "c.safetensors", lora, text_model_prefix=False)]
    states = []
    for path in files:
        model = _ours(base)
        merge_lora(model, path, 0.9)
        states.append({**model.unet.state_dict(), **{f"text.{k}": v for k, v in model.text.state_dict().items()}})
    assert all((states[0][k] - s[k]).abs().max() <= 1e-6 for s in states[1:] for k in states[0])


def test_several_files_with_their_own_weights_equal_diffusers_fusing_each(base, tmp_path):
    first = write_peft(tmp_path / "first.safetensors", _random_lora(base, UNET_TARGETS[:5], TEXT_ATTENTION, seed=4))
    second = write_kohya(tmp_path / "second.safetensors", _random_lora(base, UNET_TARGETS[3:], TEXT_MLP[:1], seed=5,
                                                                        alpha=8.0))
    pipe, ours = _diffusers_pipe(base), _ours(base)
    _fuse(pipe, first, 0.5)
    _fuse(pipe, second, -1.2)
    merge_loras(ours, [(first, 0.5), (second, -1.2)])
    assert _max_diff(ours, pipe) <= TOL


def test_a_bad_second_file_leaves_the_model_unchanged(base, tmp_path):
    good = write_kohya(tmp_path / "good.safetensors", _random_lora(base, UNET_TARGETS[:2], [], seed=6))
    bad = {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): (
        torch.randn(RANK, 7), torch.randn(7, RANK), 4.0)}
    bad = write_kohya(tmp_path / "bad.safetensors", bad)
    ours = _ours(base)
    before = copy.deepcopy(ours.unet.state_dict())
    with pytest.raises(CtxdiffError, match="has shape"):
        merge_loras(ours, [(good, 1.0), (bad, 1.0)])
    assert not _changed(before, ours.unet.state_dict())


def test_unmatched_modules_are_listed(base, tmp_path):
    path = tmp_path / "other.safetensors"
    state = {f"lora_unet_down_blocks_9_attentions_{i}_proj_in.lora_down.weight": torch.zeros(2, 4) for i in range(7)}
    state.update({k.replace("lora_down", "lora_up"): torch.zeros(4, 2) for k in state})
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(CtxdiffError, match=r"7 of its 7 modules are not in this model \(lora_unet_down_blocks_9_"
                                           r"attentions_0_proj_in.*\(2 more\)"):
        merge_lora(_ours(base), path)


def test_unknown_keys_are_listed(tmp_path):
    path = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight":
                                 torch.zeros(2, 2), "lora_unet_x.scale": torch.zeros(1)}, str(path))
    with pytest.raises(CtxdiffError, match=r"1 keys of no known LoRA layout \(lora_unet_x.scale\)"):
        read_lora(path)
    safetensors.torch.save_file({"weird.lora_A.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CtxdiffError, match=r"no known LoRA layout \(weird.lora_A.weight\)"):
        read_lora(path)


@pytest.mark.parametrize("keys, family", [
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "SDXL"),
    (["unet.add_embedding.linear_1.lora_A.weight"], "SDXL"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "Flux"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "transformer-based"),
    (["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], "another kind of model"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"], "LoHa"),
    (["lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight"], "Tucker"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"], "DoRA"),
])
def test_loras_of_other_architectures_and_variants_are_named(tmp_path, keys, family):
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(CtxdiffError, match=family):
        read_lora(path)


def test_an_sd1_lora_on_another_context_width_is_named(base, tmp_path):
    path = tmp_path / "sd15.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.zeros(RANK, 768),
                                 f"{key}.lora_up.weight": torch.zeros(64, RANK)}, str(path))
    with pytest.raises(CtxdiffError, match=r"a LoRA for SD 1.x \(its cross-attention reads 768-wide text\) but this "
                                           r"model is a model of 64-wide text context"):
        merge_lora(_ours(base), path)


def test_non_finite_lora_weights_are_refused(tmp_path):
    path = tmp_path / "nan.safetensors"
    safetensors.torch.save_file({"lora_unet_a.lora_down.weight": torch.full((2, 2), float("nan")),
                                 "lora_unet_a.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CtxdiffError, match="NaN or inf"):
        read_lora(path)


def test_lora_specs_read_file_and_weight():
    assert parse_lora_spec("style.safetensors") == (parse_lora_spec("style.safetensors:1")[0], 1.0)
    assert parse_lora_spec("a/b.safetensors:0.6")[1] == 0.6
    assert parse_lora_spec("C:/x/b.safetensors")[1] == 1.0 and str(parse_lora_spec("C:/x/b.safetensors")[0]) == (
        "C:/x/b.safetensors")
    with pytest.raises(CtxdiffError, match="finite"):
        parse_lora_spec("b.safetensors:nan")


def test_a_linear_lora_on_a_1x1_convolution_equals_its_conv_form(base, tmp_path):
    """SD 2.x trains proj_in/proj_out as linear layers, SD 1.x as 1x1 convolutions; either LoRA shape merges."""
    name = "down_blocks.0.attentions.0.proj_in"
    (down, up, alpha), = _random_lora(base, [name], [], seed=7).values()
    conv = write_kohya(tmp_path / "conv.safetensors", {("unet", name): (down, up, alpha)})
    linear = write_kohya(tmp_path / "linear.safetensors", {("unet", name): (down.flatten(1), up.flatten(1), alpha)})
    a, b = _ours(base), _ours(base)
    merge_lora(a, conv)
    merge_lora(b, linear)
    assert torch.equal(a.unet.get_submodule(name).weight, b.unet.get_submodule(name).weight)
