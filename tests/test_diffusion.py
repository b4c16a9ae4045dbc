"""The contextualized diffusion core tested as math (docs/math.md, Eq. 1-11)."""

import math

import pytest
import torch

from ctxdiff.diffusion import (
    classifier_free_guidance, ddim_invert_step, ddim_step, ddpm_step, diffusion_loss, invert_ddim,
    make_schedule, q_posterior, q_sample, q_transition, sample_ddim, sample_ddpm, timesteps_for,
    variational_bound,
)
from ctxdiff.diffusion.process import ddim_sigma, sample_timesteps, x0_from_output
from ctxdiff.models.conditioning import TextCondition

T = 50


def linear_adapter(x0, cond, t):
    """A t-dependent adapter, linear in x0: r = a_t x0 + b_t (keeps every distribution Gaussian)."""
    tt = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.sin(tt / 7.0) * 0.8 * x0 + torch.cos(tt / 5.0) * 1.5


def a_b(t, dtype=torch.float64):
    tt = torch.as_tensor(float(t), dtype=dtype)
    return torch.sin(tt / 7.0) * 0.8, torch.cos(tt / 5.0) * 1.5


@pytest.fixture(params=["linear", "scaled_linear", "cosine"])
def sched(request):
    return make_schedule(request.param, T)


def test_schedule_constants_in_paper_indexing(sched):
    assert sched.betas.dtype == torch.float64 and len(sched.betas) == T + 1
    assert sched.alpha_bar[0] == 1 and sched.k[0] == 0 and sched.betas[0] == 0
    assert torch.allclose(sched.alpha_bar[1:], torch.cumprod(1 - sched.betas[1:], 0))
    assert torch.allclose(sched.k, sched.alpha_bar.sqrt() * (1 - sched.alpha_bar.sqrt()))
    assert sched.k.max() <= 0.25 + 1e-12
    assert torch.all(sched.alpha_bar[1:] < sched.alpha_bar[:-1])


def test_transition_chain_reproduces_marginal_exactly(sched):  # Lemma 1, exact recursion
    x0 = torch.randn(4, 3, dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros(())
    for t in range(1, T + 1):
        mean, beta = q_transition(sched, mean, x0, t, linear_adapter)
        alpha = sched.alphas[t]
        var = alpha * var + beta
        abar = sched.alpha_bar[t]
        expected = abar.sqrt() * x0 + sched.k[t] * linear_adapter(x0, None, torch.full((4,), t))
        assert torch.allclose(mean, expected, atol=1e-12), t
        assert torch.allclose(var, 1 - abar, atol=1e-12), t


def test_transition_chain_reproduces_marginal_monte_carlo():  # Lemma 1, sampled
    sched = make_schedule("cosine", 20)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0.7, -0.4]], dtype=torch.float64).expand(40000, 2)
    x = x0.clone()
    for t in range(1, 21):
        mean, var = q_transition(sched, x, x0, t, linear_adapter)
        x = mean + var.sqrt() * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        if t in (1, 5, 13, 20):
            t_vec = torch.full((1,), t)
            target = sched.alpha_bar[t].sqrt() * x0[:1] + sched.k[t] * linear_adapter(x0[:1], None, t_vec)
            sd = (1 - sched.alpha_bar[t]).sqrt()
            assert torch.allclose(x.mean(0), target[0], atol=5 * sd / math.sqrt(40000)), t
            assert torch.allclose(x.std(0), sd.expand(2), rtol=0.03), t


def test_posterior_is_exact_gaussian_conditioning(sched):  # Proposition 1
    x0 = torch.randn(3, 5, dtype=torch.float64)
    x_t = torch.randn(3, 5, dtype=torch.float64)
    for t in range(2, T + 1):
        tv = torch.full((3,), t)
        m_prev = sched.alpha_bar[t - 1].sqrt() * x0 + sched.k[t - 1] * linear_adapter(x0, None, tv - 1)
        v_prev = 1 - sched.alpha_bar[t - 1]
        m_t = sched.alpha_bar[t].sqrt() * x0 + sched.k[t] * linear_adapter(x0, None, tv)
        v_t = 1 - sched.alpha_bar[t]
        cov = sched.alphas[t].sqrt() * v_prev  # Cov(x_{t-1}, x_t | x_0) from Eq. 2
        want_mean = m_prev + cov / v_t * (x_t - m_t)
        want_var = v_prev - cov**2 / v_t
        mean, var = q_posterior(sched, x_t, x0, t, linear_adapter)
        assert torch.allclose(mean, want_mean, atol=1e-10), t
        assert torch.allclose(var, want_var, atol=1e-12), t


def test_posterior_at_t1_is_the_data_point(sched):
    x0, x_1 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    mean, var = q_posterior(sched, x_1, x0, 1, linear_adapter)
    assert torch.allclose(mean, x0, atol=1e-12) and float(var) == 0.0
    assert torch.allclose(ddpm_step(sched, x_1, 1, x0, linear_adapter), x0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_posterior_keeps_marginal_for_any_eta(sched, eta):  # Lemma 2
    x0 = torch.randn(2, 3, dtype=torch.float64)
    for t, s in [(T, T - 10), (30, 29), (17, 4), (T, 1)]:
        tv, sv = torch.full((2,), t), torch.full((2,), s)
        m_t = sched.alpha_bar[t].sqrt() * x0 + sched.k[t] * linear_adapter(x0, None, tv)
        m_s = sched.alpha_bar[s].sqrt() * x0 + sched.k[s] * linear_adapter(x0, None, sv)
        zero = torch.zeros_like(x0)
        at_mean = ddim_step(sched, m_t, t, s, x0, linear_adapter, eta=eta, noise=zero)
        slope = ddim_step(sched, m_t + 1.0, t, s, x0, linear_adapter, eta=eta, noise=zero) - at_mean
        sigma = ddim_sigma(sched, t, s, eta, x0)
        var_s = slope**2 * (1 - sched.alpha_bar[t]) + sigma**2
        assert torch.allclose(at_mean, m_s, atol=1e-10), (t, s)
        assert torch.allclose(var_s, (1 - sched.alpha_bar[s]).expand_as(var_s), atol=1e-10), (t, s)


def test_ddim_with_eta_one_and_unit_stride_is_the_posterior(sched):
    x0, x_t, z = (torch.randn(2, 6, dtype=torch.float64) for _ in range(3))
    for t in (2, 10, T):
        mean, var = q_posterior(sched, x_t, x0, t, linear_adapter)
        assert torch.allclose(ddim_step(sched, x_t, t, t - 1, x0, linear_adapter, eta=1.0, noise=z),
                              mean + var.sqrt() * z, atol=1e-10)


def test_without_adapter_steps_equal_textbook_ddpm_and_ddim(sched):
    x0, x_t, z = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    zero_adapter = lambda x, c, t: torch.zeros_like(x)  # noqa: E731
    for t in (1, 2, 25, T):
        abar, alpha, beta = sched.alpha_bar[t], sched.alphas[t], sched.betas[t]
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        ho_mean = (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()  # Ho et al. Eq. 11
        ho_var = (1 - sched.alpha_bar[t - 1]) / (1 - abar) * beta
        for adapter in (None, zero_adapter):
            assert torch.allclose(ddpm_step(sched, x_t, t, x0, adapter, noise=z), ho_mean + ho_var.sqrt() * z, atol=1e-10)
        for s in {0, t - 1, max(t - 7, 0)}:
            for eta in (0.0, 0.7):
                abar_s = sched.alpha_bar[s]
                sigma = eta * ((1 - abar_s) / (1 - abar) * (1 - abar / abar_s)).sqrt()
                song = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).sqrt() * eps + sigma * z  # Song et al. Eq. 12
                assert torch.allclose(ddim_step(sched, x_t, t, s, x0, None, eta=eta, noise=z), song, atol=1e-10)


def test_ddim_step_then_inversion_returns_the_start(sched):
    x_t, x0_hat = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for t, s in [(T, T - 5), (10, 1), (2, 1)]:
        x_s = ddim_step(sched, x_t, t, s, x0_hat, linear_adapter)
        back = ddim_invert_step(sched, x_s, s, t, x0_hat, linear_adapter)
        assert torch.allclose(back, x_t, atol=1e-6)


def test_refined_inversion_round_trips_through_the_sampler():
    sched = make_schedule("scaled_linear", 100)
    weight = torch.randn(3, 3, dtype=torch.float64) * 0.1

    def x0_fn(x, cond, t):  # a fixed non-linear "model"
        return torch.tanh(x @ weight) * 0.5 + 0.3 * x * sched.alpha_bar[t].reshape(-1, 1).sqrt()

    ts = timesteps_for(100, 10)[:-1][::-1]  # increasing, t_1 >= 1
    x_start = torch.randn(4, 3, dtype=torch.float64)
    plain = invert_ddim(x0_fn, x_start, ts, sched, adapter=linear_adapter)[-1]
    refined = invert_ddim(x0_fn, x_start, ts, sched, adapter=linear_adapter, refine=30)[-1]
    recon_plain = sample_ddim(x0_fn, plain, ts[::-1], sched, adapter=linear_adapter)
    recon = sample_ddim(x0_fn, refined, ts[::-1], sched, adapter=linear_adapter)
    assert torch.allclose(recon, x_start, atol=1e-6)
    assert (recon_plain - x_start).abs().max() > 1e-4  # the plain approximation is not exact


def test_sampling_with_the_optimal_denoiser_recovers_the_data_distribution():
    sched = make_schedule("cosine", 200)
    m, sd = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)

    def smooth_ab(t):  # an adapter smooth in t: DDIM is exact only in the small-step limit
        phase = math.pi * t / 200
        return 0.8 * math.sin(phase), 1.5 * math.cos(phase)

    def adapter(x0, cond, t):
        a, b = smooth_ab(int(t[0]))
        return a * x0 + b

    def optimal_x0(x, cond, t):  # E[x_0 | x_t] for Gaussian data under Eq. 1 with that adapter
        tt = int(t[0])
        a, b = smooth_ab(tt)
        A = sched.alpha_bar[tt].sqrt() + sched.k[tt] * a
        gain = A * sd**2 / (A**2 * sd**2 + 1 - sched.alpha_bar[tt])
        return m + gain * (x - A * m - sched.k[tt] * b)

    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(20000, 2, generator=gen, dtype=torch.float64)
    for out in (sample_ddim(optimal_x0, x_T, timesteps_for(200, 100), sched, adapter=adapter),
                sample_ddpm(optimal_x0, x_T, timesteps_for(200, 200), sched, adapter=adapter, generator=gen)):
        assert torch.allclose(out.mean(0), m, atol=0.03)
        assert torch.allclose(out.std(0), sd, rtol=0.04)


def test_loss_gradient_reaches_the_adapter_through_x_t():
    sched = make_schedule("cosine", T)
    adapter_net = torch.nn.Linear(3, 3)
    denoiser = torch.nn.Linear(3, 3)
    x0 = torch.randn(16, 3)
    loss = diffusion_loss(sched, lambda x, c, t: denoiser(x), x0, adapter=lambda x, c, t: adapter_net(x))
    loss.backward()
    assert adapter_net.weight.grad.abs().sum() > 0
    # at t = 0-only... with the data untouched by the adapter the loss has no adapter gradient
    adapter_net.zero_grad()
    diffusion_loss(sched, lambda x, c, t: x, x0, adapter=lambda x, c, t: adapter_net(x)).backward()
    assert adapter_net.weight.grad.abs().sum() > 0  # through x_t even for an identity denoiser


def test_loss_is_zero_for_a_perfect_predictor_and_weights_apply():
    sched = make_schedule("cosine", T)
    x0 = torch.randn(8, 2)
    assert diffusion_loss(sched, lambda x, c, t: x0, x0).item() == 0.0
    t = torch.full((8,), 40)
    noise = torch.randn(8, 2)
    plain = diffusion_loss(sched, lambda x, c, t: torch.zeros_like(x), x0, t=t, noise=noise)
    snr = diffusion_loss(sched, lambda x, c, t: torch.zeros_like(x), x0, t=t, noise=noise, weighting="snr")
    assert torch.allclose(snr, plain * sched.snr(40).float(), rtol=1e-5)


def test_timestep_spacings_hit_the_boundaries():
    assert timesteps_for(1000, 10, "trailing")[:2] == [1000, 900] and timesteps_for(1000, 10)[-2:] == [100, 0]
    assert timesteps_for(1000, 10, "leading")[0] == 901 and timesteps_for(1000, 10, "leading")[-2:] == [1, 0]
    assert timesteps_for(1000, 10, "linspace")[0] == 1000 and timesteps_for(1000, 10, "linspace")[-2] == 1
    assert timesteps_for(50, 50) == list(range(50, -1, -1))
    for spacing in ("leading", "trailing", "linspace"):
        ts = timesteps_for(1000, 37, spacing)
        assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] == 0 and len(ts) == 38
    with pytest.raises(ValueError):
        timesteps_for(10, 11)


def test_classifier_free_guidance_extrapolates_the_x0_prediction():
    def cond_of(values):
        v = torch.tensor(values).reshape(-1, 1)
        return TextCondition(v.unsqueeze(1), torch.ones(len(values), 1, dtype=torch.bool), v)

    def x0_fn(x, cond, t):
        return x + cond.pooled

    x, t = torch.zeros(2, 3), torch.tensor([5, 5])
    guided = classifier_free_guidance(x0_fn, cond_of([0.0]), 3.0)
    assert torch.allclose(guided(x, cond_of([1.0, 2.0]), t), torch.tensor([[3.0] * 3, [6.0] * 3]))
    assert classifier_free_guidance(x0_fn, cond_of([0.0]), 1.0) is x0_fn


def test_steps_keep_the_data_dtype():
    sched = make_schedule("cosine", T)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, dtype=dtype)
        assert q_sample(sched, x, 10, linear_adapter).dtype == dtype
        assert ddim_step(sched, x, 10, 5, x, linear_adapter).dtype == dtype
        assert ddpm_step(sched, x, 10, x, linear_adapter).dtype == dtype


def _gaussian_setup(sched, m, sd):
    def optimal_x0(x, cond, t, adapter_ab=None):
        tt = int(t[0])
        a, b = adapter_ab(tt) if adapter_ab else (0.0, 0.0)
        A = sched.alpha_bar[tt].sqrt() + sched.k[tt] * a
        gain = A * sd**2 / (A**2 * sd**2 + 1 - sched.alpha_bar[tt])
        return m + gain * (x - A * m - sched.k[tt] * b)
    return optimal_x0


def test_bits_per_dim_bound_is_above_the_true_nll_for_gaussian_data():
    sched = make_schedule("linear", 100)
    m, sd = 0.1, 0.25
    gen = torch.Generator().manual_seed(0)
    x0 = ((m + sd * torch.randn(4000, 1, generator=gen, dtype=torch.float64)).clamp(-1, 1) * 127.5).round() / 127.5
    optimal = _gaussian_setup(sched, m, sd)
    for adapter, ab in ((None, None), (linear_adapter, a_b)):
        bound = variational_bound(sched, lambda x, c, t: optimal(x, c, t, ab), x0, adapter=adapter, generator=gen)
        total = bound.total.mean().item()
        # true NLL of the discretised data (bins of width 2/255) under N(m, sd^2), in bits
        true_nll = (-(torch.distributions.Normal(m, sd).log_prob(x0) + math.log(2 / 255.0)) / math.log(2)).mean().item()
        assert math.isfinite(total)
        assert total >= true_nll - 0.02, (total, true_nll)
        assert total < true_nll + 3.0  # T = 100 steps: a loose but sane bound
        worse = variational_bound(sched, lambda x, c, t: 0.8 * optimal(x, c, t, ab), x0, adapter=adapter, generator=gen)
        assert worse.total.mean().item() > total + 0.1  # the optimal predictor gives the tightest bound


def test_adapter_free_bound_equals_the_ddpm_bound():
    sched = make_schedule("cosine", 30)
    x0 = torch.rand(5, 2, 2, dtype=torch.float64) * 2 - 1
    x0_fn = lambda x, c, t: torch.tanh(x) * 0.9  # noqa: E731
    ours = variational_bound(sched, x0_fn, x0, generator=torch.Generator().manual_seed(3))
    # textbook DDPM (Ho et al.) terms with the same draws of x_t
    gen = torch.Generator().manual_seed(3)
    dims, nats_to_bits = 4, 1 / (4 * math.log(2))
    abar_T = sched.alpha_bar[30]
    prior = 0.5 * ((1 - abar_T) + abar_T * x0**2 - 1 - torch.log(1 - abar_T))
    diff = torch.zeros(5, dtype=torch.float64)
    for t in range(2, 31):
        abar, alpha, beta = sched.alpha_bar[t], sched.alphas[t], sched.betas[t]
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        eps_hat = (x_t - abar.sqrt() * x0_fn(x_t, None, t)) / (1 - abar).sqrt()
        mu_q = (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
        mu_p = (x_t - beta / (1 - abar).sqrt() * eps_hat) / alpha.sqrt()
        var = (1 - sched.alpha_bar[t - 1]) / (1 - abar) * beta
        diff += ((mu_q - mu_p) ** 2 / (2 * var)).flatten(1).sum(1)
    assert torch.allclose(ours.prior, prior.flatten(1).sum(1) * nats_to_bits, atol=1e-10)
    assert torch.allclose(ours.diffusion, diff * nats_to_bits, atol=1e-8)
    assert dims == x0[0].numel()


def test_one_stacked_adapter_call_equals_two_separate_calls():
    sched = make_schedule("cosine", T)
    calls = []

    def adapter(x0, cond, t):  # depends on x0, the text and t
        calls.append(x0.shape[0])
        return linear_adapter(x0, None, t) + cond.pooled[:, :1, None] * 0.3

    cond = TextCondition(torch.randn(2, 3, 4, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool),
                         torch.randn(2, 4, dtype=torch.float64))
    x_t, x0_hat = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    stacked = ddim_step(sched, x_t, 30, 20, x0_hat, adapter, cond)
    assert calls == [4]  # one call on the doubled batch
    separate = ddim_step(sched, x_t, 30, 20, x0_hat, lambda x, c, t: adapter(x, cond, t), None)
    assert torch.allclose(stacked, separate, atol=1e-12)
    mean, _ = q_posterior(sched, x_t, x0_hat, 30, adapter, cond)
    mean_separate, _ = q_posterior(sched, x_t, x0_hat, 30, lambda x, c, t: adapter(x, cond, t), None)
    assert torch.allclose(mean, mean_separate, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_every_parameterisation_inverts_eq1_for_its_effective_target(sched, prediction_type):
    """With x_t from Eq. 1 (bias included), the network output that equals its target (x0; the
    effective noise eps' = (x_t - sqrt(abar) x0)/sqrt(1 - abar); v' = sqrt(abar) eps' - sqrt(1 - abar) x0)
    gives back x0 exactly at every step."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(T, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(T, 3, 4, 4, generator=g,
                                                                                 dtype=torch.float64)
    t = torch.arange(1, T + 1)
    x_t = q_sample(sched, x0, t, linear_adapter, None, eps)
    abar = sched.alpha_bar[t].view(-1, 1, 1, 1)
    eff = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    target = {"sample": x0, "epsilon": eff, "v_prediction": abar.sqrt() * eff - (1 - abar).sqrt() * x0}
    torch.testing.assert_close(x0_from_output(prediction_type, target[prediction_type], x_t, abar), x0,
                               atol=1e-9 if prediction_type != "epsilon" else 1e-6, rtol=0)
    assert not torch.allclose(eff, eps)   # the bias is in the target: eps' != eps


def test_v_parameterisation_is_the_identity_on_x_t_near_data_and_direct_x0_at_t_max():
    sched = make_schedule("cosine", 1000)
    x_t, out = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    abar = sched.alpha_bar[torch.tensor([1, 1000])].view(-1, 1, 1, 1)
    x0 = x0_from_output("v_prediction", out, x_t, abar)
    assert (x0[0] - x_t[0]).abs().max() < 0.02 and (x0[1] + out[1]).abs().max() < 0.02
    with pytest.raises(ValueError, match="unknown prediction type"):
        x0_from_output("x1", out, x_t, abar)


def test_snr_plus_one_weighting_of_a_v_output_is_the_plain_v_loss(sched):
    """Eq. 6 with lambda_t = SNR_t + 1 on x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat equals
    mean ||v' - v_hat||^2 (v' the effective v target, bias included), at every t."""
    g = torch.Generator().manual_seed(3)
    x0, eps, v_hat = (torch.randn(T, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.arange(1, T + 1)
    abar = sched.alpha_bar[t].view(-1, 1, 1)
    x_t = q_sample(sched, x0, t, linear_adapter, None, eps)
    loss = diffusion_loss(sched, lambda x, c, tt: x0_from_output("v_prediction", v_hat, x, abar), x0,
                          adapter=linear_adapter, t=t, noise=eps, weighting="snr_plus_one")
    eff = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    v_target = abar.sqrt() * eff - (1 - abar).sqrt() * x0
    torch.testing.assert_close(loss, (v_target - v_hat).pow(2).flatten(1).mean(1).mean().float(), rtol=1e-5, atol=0)


def test_timestep_sampling_is_uniform_plus_the_asked_share_of_high_noise_steps():
    T, n = 1000, 400_000
    plain = sample_timesteps(n, T, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randint(1, T + 1, (n,), generator=torch.Generator().manual_seed(3)))
    t = sample_timesteps(n, T, torch.Generator().manual_seed(3), high_noise_share=0.3, high_noise_from=0.9)
    assert t.min() >= 1 and t.max() <= T
    high = t > 900
    # P(t > 0.9 T) = 0.7 * 0.1 + 0.3; below it the density is 0.7 / T per step, above it (0.07 + 0.3) / 100
    assert high.float().mean().item() == pytest.approx(0.37, abs=0.005)
    counts = torch.bincount(t, minlength=T + 1)[1:].float()
    assert counts[:900].mean().item() == pytest.approx(n * 0.7 / T, rel=0.01)
    assert counts[900:].mean().item() == pytest.approx(n * 0.37 / 100, rel=0.01)
    assert counts[900:].std().item() < 0.05 * counts[900:].mean().item()     # uniform within the band
