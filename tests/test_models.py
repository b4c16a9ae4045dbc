"""Claims about the denoising U-Nets and the context-aware adapter r_phi(x_0, c, t)."""

import dataclasses
import json

import pytest
import torch

from ctxdiff.models.adapter import ADAPTER_PRESETS, AdapterConfig, ContextAdapter, build_adapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.layers import attention
from ctxdiff.models.unet import UNET_PRESETS, UNetConfig, UNet, build_unet, coordinate_maps


def text(batch: int, dim: int = 32, length: int = 6, real: int = 4, seed: int = 0) -> TextCondition:
    """Random text condition whose first `real` tokens are real and the rest padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :real] = True
    return TextCondition(torch.randn(batch, length, dim, generator=g), mask, torch.randn(batch, dim, generator=g))


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """Move every weight off its initialisation (zero-initialised residual branches included)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def sr_inputs(x: torch.Tensor) -> dict:
    return {"lowres": torch.randn_like(x), "lowres_t": torch.full((x.shape[0],), 0.2)}


@pytest.mark.parametrize("preset", ["tiny", "tiny-sr"])
@pytest.mark.parametrize("size", [(16, 16), (48, 32)])
def test_unet_predicts_x0_shaped_like_x_t_at_any_divisible_resolution(preset, size):
    net = build_unet(preset)
    x = torch.randn(2, 3, *size)
    extra = sr_inputs(x) if net.config.lowres_cond else {}
    assert net(x, torch.tensor([1, 1000]), text(2), **extra).shape == x.shape


def test_unet_refuses_bad_inputs_with_clear_errors():
    base, sr = build_unet("tiny"), build_unet("tiny-sr")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="multiples of 2"):
        base(torch.randn(1, 3, 31, 31), 5, text(1))
    with pytest.raises(ValueError, match="lowres"):
        sr(x, 5, text(1))
    with pytest.raises(ValueError, match="lowres_cond"):
        base(x, 5, text(1), lowres=x)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=36, channel_mults=(1, 2, 2, 2))


def test_unet_output_depends_on_text_tokens_pooled_text_and_timestep():
    net = perturbed(build_unet("tiny"))
    x, t, cond = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), text(2)
    out = net(x, t, cond)
    other_tokens = TextCondition(text(2, seed=1).tokens, cond.mask, cond.pooled)
    other_pooled = TextCondition(cond.tokens, cond.mask, text(2, seed=1).pooled)
    assert not torch.allclose(out, net(x, t, other_tokens), atol=1e-4)
    assert not torch.allclose(out, net(x, t, other_pooled), atol=1e-4)
    assert not torch.allclose(out, net(x, t + 200, cond), atol=1e-4)


def test_sr_unet_output_depends_on_lowres_image_and_augmentation_level():
    net = perturbed(build_unet("tiny-sr"))
    x, cond = torch.randn(2, 3, 32, 32), text(2)
    lowres = torch.randn_like(x)
    out = net(x, 7, cond, lowres=lowres, lowres_t=torch.zeros(2))
    assert not torch.allclose(out, net(x, 7, cond, lowres=lowres, lowres_t=torch.full((2,), 0.5)), atol=1e-4)
    assert not torch.allclose(out, net(x, 7, cond, lowres=-lowres, lowres_t=torch.zeros(2)), atol=1e-4)


def test_padded_text_tokens_do_not_change_unet_output():
    net = perturbed(build_unet("tiny"))
    x, cond = torch.randn(2, 3, 32, 32), text(2, real=3)
    garbage = cond.tokens.clone()
    garbage[:, 3:] = 100.0 * torch.randn_like(garbage[:, 3:])
    out = net(x, 50, cond)
    torch.testing.assert_close(net(x, 50, TextCondition(garbage, cond.mask, cond.pooled)), out)
    all_padding = TextCondition(cond.tokens, torch.zeros_like(cond.mask), cond.pooled)
    assert torch.isfinite(net(x, 50, all_padding)).all()


def test_coordinate_maps_run_left_to_right_and_top_to_bottom_at_pixel_centres():
    maps = coordinate_maps(torch.zeros(2, 3, 4, 6))
    assert maps.shape == (2, 2, 4, 6)
    torch.testing.assert_close(maps[1, 0, 2], torch.tensor([-5, -3, -1, 1, 3, 5]) / 6)   # x, any row
    torch.testing.assert_close(maps[0, 1, :, 4], torch.tensor([-3.0, -1, 1, 3]) / 4)      # y, any column


@pytest.mark.parametrize("preset", ["tiny", "tiny-sr"])
def test_coord_channels_widen_the_stem_and_run_at_any_size(preset):
    config = dataclasses.replace(UNET_PRESETS[preset], coord_channels=True)
    net = perturbed(UNet(config))
    assert net.conv_in.in_channels == (6 if config.lowres_cond else 3) + 2
    x = torch.randn(2, 3, 48, 32)
    out = net(x, 10, text(2), **(sr_inputs(x) if config.lowres_cond else {}))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_layout_maps_join_the_stem_and_carry_the_pooled_prompt_to_the_output():
    config = dataclasses.replace(UNET_PRESETS["tiny"], layout_maps=3)
    net = perturbed(UNet(config))
    assert net.conv_in.in_channels == 3 + 3
    cond, grid = text(2), net.layout_grid
    native = net.layout(cond.pooled, (grid, grid))   # at the lowest resolution: the MLP's maps as they are
    torch.testing.assert_close(native, net.layout_embed(cond.pooled).view(2, 3, grid, grid))
    assert not torch.allclose(native[0], native[1])
    with torch.no_grad():   # FiLM no longer sees the pooled embedding: only the maps can
        net.pooled_embed[-1].weight.zero_()
        net.pooled_embed[-1].bias.zero_()
    x, swapped = torch.randn(2, 3, 48, 32), TextCondition(cond.tokens, cond.mask, cond.pooled.flip(0))
    assert not torch.allclose(net(x, 10, cond), net(x, 10, swapped), atol=1e-4)
    with torch.no_grad():
        net.layout_embed[-1].weight.zero_()
    torch.testing.assert_close(net(x, 10, cond), net(x, 10, swapped))


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    config = dataclasses.replace(UNET_PRESETS["tiny-sr"], gradient_checkpointing=False)
    plain = perturbed(UNet(config)).train()
    ckpt = UNet(dataclasses.replace(config, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    extra = sr_inputs(x)
    outs, grads = [], []
    for net in (plain, ckpt):
        out = net(x, torch.tensor([3, 900]), text(2), **extra)
        out.square().mean().backward()
        outs.append(out)
        grads.append([p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for g_plain, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_plain, g_ckpt)


@pytest.mark.parametrize("x_shape, patch", [((3, 32, 32), 8), ((4, 16, 16), 4)])
def test_adapter_bias_is_exactly_zero_at_init_and_shaped_like_x(x_shape, patch):
    adapter = ContextAdapter(AdapterConfig(x_shape=x_shape, patch_size=patch, width=32, blocks=2, text_dim=32))
    x0 = torch.randn(3, *x_shape)
    r = adapter(x0, text(3), torch.tensor([1, 500, 1000]))
    assert r.shape == x0.shape
    assert torch.equal(r, torch.zeros_like(r))


def test_adapter_after_one_step_is_nonzero_and_depends_on_text_and_timestep():
    adapter = build_adapter("tiny")
    x0, cond = torch.randn(2, 3, 32, 32), text(2)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    (adapter(x0, cond, 100) - torch.randn_like(x0)).square().mean().backward()
    opt.step()
    r = adapter(x0, cond, 100)
    assert r.abs().max() > 0
    assert not torch.allclose(r, adapter(x0, text(2, seed=1), 100), atol=1e-5)
    assert not torch.allclose(r, adapter(x0, cond, 900), atol=1e-5)
    torch.testing.assert_close(r, adapter(x0, cond, torch.tensor([100, 100])))
    torch.testing.assert_close(r[1:], adapter(x0[1:], cond[1:], 100))
    assert adapter(torch.randn(1, 3, 48, 24), cond[:1], 100).shape == (1, 3, 48, 24)   # resampled positions


def test_adapter_bound_keeps_the_bias_inside_it_and_leaves_small_biases_alone():
    cfg = AdapterConfig(x_shape=(3, 16, 16), patch_size=4, width=32, blocks=1, text_dim=32)
    free, bounded = ContextAdapter(cfg), ContextAdapter(dataclasses.replace(cfg, bound=1.0))
    bounded.load_state_dict(free.state_dict())
    x0, cond = torch.randn(2, 3, 16, 16), text(2)
    for scale in (50.0, 1e-3):
        with torch.no_grad():
            for a in (free, bounded):
                torch.nn.init.normal_(a.head.weight, std=scale)
            bounded.head.weight.copy_(free.head.weight)
        r_free, r = free(x0, cond, 500), bounded(x0, cond, 500)
        torch.testing.assert_close(r, torch.tanh(r_free))
        if scale > 1:
            assert r_free.abs().max() > 5 and r.abs().max() <= 1
    assert r_free.abs().max() < 0.05
    torch.testing.assert_close(r, r_free, rtol=1e-3, atol=0)   # small biases: unchanged
    with pytest.raises(ValueError, match="bound"):
        AdapterConfig(bound=0.0)


def test_adapter_clip_branch_reads_frozen_external_tokens_kept_out_of_its_state():
    calls = []
    encoder = torch.nn.Linear(3, 24)

    def image_encoder(x):   # 10 tokens of width 24, a grid unrelated to the 4x4 patch grid
        calls.append(torch.is_grad_enabled())
        return encoder(x[:, :, :10, 0].transpose(1, 2))

    config = AdapterConfig(x_shape=(3, 16, 16), patch_size=4, width=32, blocks=1, text_dim=32,
                           image_dim=24, image_branch="clip")
    adapter = ContextAdapter(config, image_encoder)
    assert all(not name.startswith("image_encoder") for name in adapter.state_dict())
    x0, cond = torch.randn(2, 3, 16, 16), text(2)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    (adapter(x0, cond, 5) - torch.randn_like(x0)).square().mean().backward()
    opt.step()
    assert calls == [False]
    r = adapter(x0, cond, 5)
    with torch.no_grad():
        encoder.weight.neg_()
    assert r.shape == x0.shape and not torch.allclose(r, adapter(x0, cond, 5), atol=1e-5)
    with pytest.raises(ValueError, match="image_encoder"):
        ContextAdapter(config)


def test_models_run_under_bf16_autocast():
    unet, adapter = build_unet("tiny"), build_adapter("tiny")
    x, cond = torch.randn(2, 3, 32, 32), text(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0_hat = unet(x, torch.tensor([1, 1000]), cond)
        r = adapter(x, cond, 3)
        (x0_hat.float().square().mean() + r.float().square().mean()).backward()
    assert x0_hat.shape == r.shape == x.shape and torch.isfinite(x0_hat).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.head.parameters())


def test_configs_survive_a_json_round_trip():
    for config in (*UNET_PRESETS.values(), *ADAPTER_PRESETS.values()):
        data = json.loads(json.dumps(dataclasses.asdict(config)))
        assert type(config)(**data) == config


def count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize("name, low, high", [
    ("tiny", 0.1e6, 0.5e6), ("tiny-sr", 0.1e6, 0.5e6), ("shapes-base", 4e6, 6e6), ("shapes-sr", 1.5e6, 3e6),
    ("base64", 300e6, 1000e6), ("sr256", 300e6, 1000e6)])
def test_unet_presets_have_their_intended_size(name, low, high):
    assert low <= count(lambda: build_unet(name)) <= high


@pytest.mark.parametrize("name, low, high", [
    ("tiny", 10e3, 100e3), ("shapes-base", 0.5e6, 2e6), ("shapes-sr", 0.5e6, 2e6),
    # "paper": ~38M trainable; plus the frozen CLIP ViT-B/32 towers (~151M) it is the paper's 188M.
    ("paper", 30e6, 45e6)])
def test_adapter_presets_have_their_intended_size(name, low, high):
    encoder = (lambda x: x) if ADAPTER_PRESETS[name].image_branch == "clip" else None
    assert low <= count(lambda: ContextAdapter(ADAPTER_PRESETS[name], encoder)) <= high


def test_a_v_prediction_unet_returns_x0_read_from_its_output_under_its_schedule():
    from ctxdiff.diffusion import make_schedule
    from ctxdiff.diffusion.process import x0_from_output

    config = dataclasses.replace(UNET_PRESETS["tiny"], image_size=16, timesteps=100)
    raw = perturbed(UNet(config))
    v_net = UNet(dataclasses.replace(config, prediction_type="v_prediction", schedule="cosine")).eval()
    v_net.load_state_dict(raw.state_dict())
    x, cond, t = torch.randn(3, 3, 16, 16), text(3), torch.tensor([1, 50, 100])
    abar = make_schedule("cosine", 100).alpha_bar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(v_net(x, t, cond), x0_from_output("v_prediction", raw(x, t, cond), x, abar))
    with pytest.raises(ValueError, match="needs the noise schedule"):
        UNet(dataclasses.replace(config, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        UNetConfig(prediction_type="x1")


@pytest.mark.parametrize("dtype,grad,tokens,kv_tokens,masked,causal", [
    (torch.bfloat16, True, 64, 9, True, False),     # the math-kernel branch: bf16 training, short sequences
    (torch.bfloat16, True, 16, 16, False, True),
    (torch.bfloat16, True, 200, 200, False, False),  # too long: PyTorch's own choice
    (torch.float32, False, 64, 64, False, False),
])
def test_attention_is_softmax_attention_in_value_and_gradient(dtype, grad, tokens, kv_tokens, masked, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (tokens, kv_tokens, kv_tokens))
    mask = torch.rand(2, 1, 1, kv_tokens, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True
    leaves = [x.to(dtype).requires_grad_(grad) for x in (q, k, v)]
    out = attention(*leaves, attn_mask=mask, is_causal=causal)
    reference = [x.double().requires_grad_() for x in (q, k, v)]
    scores = (reference[0] @ reference[1].transpose(-2, -1)) / 4
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(tokens, kv_tokens, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1) @ reference[2]
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.double(), expected, atol=tolerance), (out.double() - expected).abs().max()
    if grad:
        out.float().square().sum().backward()
        expected.square().sum().backward()
        for leaf, ref in zip(leaves, reference):
            scale = ref.grad.abs().max()
            assert torch.allclose(leaf.grad.double(), ref.grad, atol=0.05 * scale), (leaf.grad.double() - ref.grad).abs().max()
