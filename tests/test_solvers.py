"""The context-aware fast solvers tested as math (ctxdiff/diffusion/solvers.py,
docs/math.md#context-aware-solvers-in-shifted-coordinates).

- With r = 0 each solver is its diffusers scheduler, network call for network call.
- Euler is Eq. 11 (DDIM) exactly, adapter included.
- The shift identity at every step: with an adapter, y = x - k r_phi(x0_hat) is stepped by the plain
  (diffusers) solver fed the same x0_hat.
- On Gaussian data, whose exact x0 predictor under the biased forward process is known in closed form,
  each deterministic solver converges to the exact probability-flow endpoint (slopes printed, `-s`).
"""

import math

import pytest
import torch

from ctxdiff.diffusion import (
    SOLVERS, make_schedule, sample_ddim, sample_ddpm, sample_solver, solver_grid, timesteps_for,
)
from ctxdiff.diffusion.schedule import schedule_from_alpha_bar
from ctxdiff.diffusion.solvers import karras_sigmas, sigma_at, t_from_sigma
from ctxdiff.errors import UsageError
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.pipelines.text2image import run_sampler
from ctxdiff.recipes import SampleConfig, from_dict

T_SD = 1000
W = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5


def fake_model(x, t):
    """A fixed non-linear x0 predictor of x_t and the (possibly fractional) paper step t."""
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.7 * torch.tanh(x @ W) + 0.2 * torch.cos(3 * tt / T_SD) * x


def nonlinear_adapter(x0, cond, t):
    """r_phi(x0, t): non-linear in x0, smooth in (fractional) t."""
    tt = t.to(torch.float64).reshape(-1, *([1] * (x0.dim() - 1)))
    return 0.8 * torch.sin(math.pi * tt / T_SD) * torch.tanh(x0) + 1.5 * torch.cos(math.pi * tt / T_SD)


def _alpha(sigma):
    return 1 / math.sqrt(1 + sigma**2)


def _k(sigma):
    return _alpha(sigma) * (1 - _alpha(sigma))


def _record(model, calls):
    def x0_fn(x, cond, t):
        out = model(x, t)
        calls.append((x.clone(), float(t[0]), out))
        return out
    return x0_fn


# --------------------------------------------------------------------------- r = 0: diffusers, call for call

diffusers = pytest.importorskip("diffusers", reason="the parity extra (diffusers) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

#        solver: (diffusers scheduler, its config, state in sigma units (VE: sample = y sqrt(1 + sigma^2)))
REFERENCES = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), False),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2), False),
    "euler": ("EulerDiscreteScheduler", {}, True),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, True),
    "heun": ("HeunDiscreteScheduler", {}, True),
    "unipc": ("UniPCMultistepScheduler", {}, False),
}
INTEGER_TIMES = ("dpmpp-2m", "dpmpp-2m-sde", "unipc")  # round Karras steps to integers, as diffusers
CASES = [(name, karras) for name in REFERENCES for karras in (False, True) if name != "euler-a" or not karras]
PARITY: dict[str, float] = {}  # max abs difference per case, printed at the end


def reference(name, karras, steps):
    """The diffusers scheduler of `name` on SD's schedule (our betas as trained_betas; x0 prediction,
    epsilon for Euler a, which has no 'sample'), and our Schedule of its float32 abar (diffusers
    accumulates the product in float32: ~1e-5 apart from ours over 1000 steps)."""
    cls_name, config, ve = REFERENCES[name]
    kwargs = dict(num_train_timesteps=T_SD, trained_betas=make_schedule("scaled_linear", T_SD).betas[1:].numpy(),
                  prediction_type="epsilon" if name == "euler-a" else "sample",
                  timestep_spacing="linspace" if karras else "trailing", **config)  # linspace: Euler/Heun's
    if karras:                                                                        # Karras range is the full one
        kwargs["use_karras_sigmas"] = True
    sched_d = getattr(diffusers, cls_name)(**kwargs)
    sched_d.set_timesteps(steps)
    ours = schedule_from_alpha_bar(torch.cat([torch.ones(1, dtype=torch.float64), sched_d.alphas_cumprod.double()]))
    return sched_d, ours, ve


def run_reference(sched_d, ve, name, x_T, seed):
    """diffusers' own loop from the VP x_T (noise: the same generator stream as ours, or for the SDE
    solver the same draws as variance_noise); every network call (VP input, paper step) and the output."""
    sample = x_T * math.sqrt(1 + float(sched_d.sigmas[0]) ** 2) if ve else x_T.clone()
    gen = torch.Generator().manual_seed(seed)
    steps = len(sched_d.timesteps)
    noises = [torch.randn(x_T.shape, generator=gen, dtype=x_T.dtype) for _ in range(steps - 1)]
    noises.append(torch.zeros_like(x_T))
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for j, tau in enumerate(sched_d.timesteps):
        x_in = sched_d.scale_model_input(sample, tau)
        x0 = fake_model(x_in, float(tau) + 1)
        calls.append((x_in, float(tau) + 1))
        out = (sample - x0) / float(sched_d.sigmas[j]) if name == "euler-a" else x0
        extra = {"dpmpp-2m-sde": {"variance_noise": noises[j]}, "euler-a": {"generator": gen}}.get(name, {})
        sample = sched_d.step(out, tau, sample, **extra).prev_sample
    return calls, sample


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("name,karras", CASES)
def test_without_adapter_each_solver_is_its_diffusers_scheduler_call_for_call(name, karras, steps):
    sched_d, sched, ve = reference(name, karras, steps)
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_calls, ref_out = run_reference(sched_d, ve, name, x_T, seed=5)
    calls = []
    out = sample_solver(name, _record(fake_model, calls), x_T, timesteps_for(T_SD, steps), sched, karras=karras,
                        generator=torch.Generator().manual_seed(5))
    assert len(calls) == len(ref_calls) == (2 * steps - 1 if name == "heun" else steps)
    for (x, t, _), (x_ref, t_ref) in zip(calls, ref_calls):
        assert abs(t - t_ref) < 1e-3   # the networks' paper steps (diffusers' float32 timesteps, + 1)
    diff = max([(x - x_ref).abs().max().item() for (x, _, _), (x_ref, _) in zip(calls, ref_calls)]
               + [(out - ref_out).abs().max().item()])
    PARITY[f"{name}{'-karras' if karras else ''} N={steps}"] = diff
    assert diff < 1e-5, diff  # diffusers steps in float32; measured ~1e-7


def test_the_grid_is_diffusers_grid():
    for name, karras in CASES:
        sched_d, sched, _ = reference(name, karras, 12)
        grid = solver_grid(sched, timesteps_for(T_SD, 12), karras, integer_times=name in INTEGER_TIMES)
        distinct = sched_d.sigmas[[0, *range(1, len(sched_d.sigmas), 2)]] if name == "heun" else sched_d.sigmas
        assert torch.allclose(torch.tensor(grid.sigmas, dtype=torch.float64), distinct.double(), rtol=1e-6), name
        taus = sched_d.timesteps[[0, *range(1, len(sched_d.timesteps), 2)]] if name == "heun" else sched_d.timesteps
        assert torch.allclose(torch.tensor(grid.times[:-1], dtype=torch.float64), taus.double() + 1, atol=1e-3), name


def test_karras_sigmas_span_the_model_and_map_to_its_steps():
    sched = make_schedule("scaled_linear", T_SD)
    sigmas = karras_sigmas(sched, 10)
    assert sigmas[0] == pytest.approx(sigma_at(sched, T_SD)) and sigmas[-1] == pytest.approx(sigma_at(sched, 1))
    assert all(b < a for a, b in zip(sigmas, sigmas[1:]))
    for t in (1.0, 17.0, 500.25, 999.5, 1000.0):  # t_from_sigma inverts the log-linear interpolation
        assert t_from_sigma(sched, sigma_at(sched, t)) == pytest.approx(t, abs=1e-9)
    for t in (1, 250, 1000):
        assert sigma_at(sched, t) == pytest.approx(float(((1 - sched.alpha_bar[t]) / sched.alpha_bar[t]).sqrt()))


# --------------------------------------------------------------------------- Eq. 11 and the shift identity


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_euler_is_eq11_with_the_adapter(spacing):
    """Euler in y on z = y / sqrt(abar) is Song et al.'s DDIM step, so context-aware Euler is Eq. 11."""
    sched = make_schedule("cosine", 200)
    x_T = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = lambda x, c, t: fake_model(x, t)  # noqa: E731
    ts = timesteps_for(200, 13, spacing)
    euler = sample_solver("euler", model, x_T, ts, sched, adapter=nonlinear_adapter)
    ddim = sample_ddim(model, x_T, ts, sched, adapter=nonlinear_adapter)
    assert torch.allclose(euler, ddim, atol=1e-12)


SHIFT_CASES = [(name, False) for name in REFERENCES] + [(name, True) for name in ("euler", "heun", "dpmpp-2m", "unipc")]


@pytest.mark.parametrize("name,karras", SHIFT_CASES)
def test_the_shifted_state_follows_the_plain_solver_at_every_step(name, karras):
    """Run the context-aware solver with an adapter, recording each network call (x shown, t, x0_hat).
    At every step, y = x - k_i r_phi(x0_hat, t_i) fed to the plain diffusers scheduler with the same
    x0_hat must give the next state minus the bias at the next point, y' = x' - k_{i+1} r_phi(x0_hat, t_{i+1})
    (k, r recomputed here). Heun's second stage is the solver's own y at the Euler point; UniPC's
    corrected point is re-translated with the new prediction (added to diffusers' corrector here)."""
    steps = 9
    sched_d, sched, ve = reference(name, karras, steps)
    grid = solver_grid(sched, timesteps_for(T_SD, steps), karras, integer_times=name in INTEGER_TIMES)
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    calls = []
    out = sample_solver(name, _record(fake_model, calls), x_T, timesteps_for(T_SD, steps), sched, karras=karras,
                        adapter=nonlinear_adapter, generator=torch.Generator().manual_seed(5))

    def bias(x0, i):
        if grid.sigmas[i] == 0:
            return 0.0
        t = torch.full((x0.shape[0],), float(grid.times[i]), dtype=torch.float64)
        return _k(grid.sigmas[i]) * nonlinear_adapter(x0, None, t)

    gen, noise_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    delta = [0.0]
    if name == "unipc":
        corrector = sched_d.multistep_uni_c_bh_update
        sched_d.multistep_uni_c_bh_update = lambda *a, **kw: corrector(*a, **kw) + delta[0]
    step_of = [j // 2 + j % 2 if name == "heun" else j for j in range(len(calls))]  # grid point of each call
    first = [name != "heun" or j % 2 == 0 for j in range(len(calls))]
    worst = 0.0
    for j, tau in enumerate(sched_d.timesteps):
        x_in, _, x0_hat = calls[j]
        i = step_of[j] if first[j] else step_of[j] - 1   # the step this call belongs to
        anchor = x0_hat if first[j] else calls[j - 1][2]  # the step's first prediction
        sigma = grid.sigmas[step_of[j]]
        y = x_in - (bias(anchor, i) if first[j] else bias(anchor, i + 1))
        if name == "unipc" and i > 0:
            delta[0] = bias(calls[j - 1][2], i) - bias(x0_hat, i)
        sample = y * math.sqrt(1 + sigma**2) if ve else y
        sched_d.scale_model_input(sample, tau)  # (the loop's call; the input itself is ours, recorded)
        out_d = (sample - x0_hat) / sigma if name == "euler-a" else x0_hat
        noise = torch.randn(y.shape, generator=noise_gen, dtype=y.dtype) if i < steps - 1 else torch.zeros_like(y)
        extra = {"dpmpp-2m-sde": {"variance_noise": noise}, "euler-a": {"generator": gen}}.get(name, {})
        y_next = sched_d.step(out_d, tau, sample, **extra).prev_sample * (_alpha(grid.sigmas[i + 1]) if ve else 1)
        x_next = calls[j + 1][0] if j + 1 < len(calls) else out
        worst = max(worst, (x_next - bias(anchor, i + 1) - y_next).abs().max().item())
    print(f"\n{name}{'-karras' if karras else ''}: shift identity, max |y' - plain step(y)| = {worst:.1e}")
    assert worst < 1e-5  # diffusers' float32 arithmetic


def test_first_order_steps_and_the_final_jump_are_eq11():
    """DPM-Solver++ and UniPC start with a first-order step, which is Eq. 11; every solver's last step
    (to sigma = 0) returns x0_hat."""
    sched = make_schedule("scaled_linear", T_SD)
    x_T = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model = lambda x, c, t: fake_model(x, t)  # noqa: E731
    ts = timesteps_for(T_SD, 10)
    ddim = []
    sample_ddim(model, x_T, ts, sched, adapter=nonlinear_adapter, callback=lambda **s: ddim.append(s))
    for name in ("dpmpp-2m", "unipc"):
        states = []
        sample_solver(name, model, x_T, ts, sched, adapter=nonlinear_adapter, callback=lambda **s: states.append(s))
        assert torch.allclose(states[0]["x"], ddim[0]["x"], atol=1e-12), name
    for name in SOLVERS:
        states = []
        out = sample_solver(name, model, x_T, ts, sched, adapter=nonlinear_adapter, generator=torch.Generator(),
                            callback=lambda **s: states.append(s))
        assert torch.allclose(out, states[-1]["x0_hat"], atol=1e-12) and torch.equal(out, states[-1]["x"]), name


# --------------------------------------------------------------------------- convergence on Gaussian data

T_FINE = 100_000  # a fine discrete schedule: the integer steps of the solvers' grids are near-uniform in log sigma
M = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
S = torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64)


class GaussianWorld:
    """x0 ~ N(M, diag(S^2)) and a linear adapter r = a_t x0 + b_t: every marginal of Eq. 1 stays Gaussian,
    x_t ~ N(A_t M + k_t b_t, A_t^2 S^2 + 1 - abar_t) with A_t = sqrt(abar_t) + k_t a_t, and
    E[x0 | x_t] = M + g_t (x_t - A_t M - k_t b_t), g_t = A_t S^2 / (A_t^2 S^2 + 1 - abar_t), exactly.

    The probability-flow ODE of Eq. 1 (the limit of Eq. 11 with this exact predictor; its velocity is
    E[d/dt (sqrt(abar) x0 + k r(x0) + sqrt(1 - abar) eps) | x_t]) maps each marginal onto the next;
    per dimension the only monotone such map is the affine one, so the flow from t0 to t1 is
    x_t1 = mu_t1 + sqrt(V_t1 / V_t0)(x_t0 - mu_t0). Every solver ends with x0_hat at its last grid
    point t1, so the exact endpoint of a grid t0 > ... > t1 > 0 is E[x0 | x_t1] of the flowed x_t0."""

    def __init__(self, sched, a, b):
        self.sched, self.a, self.b = sched, a, b

    def parts(self, t):
        abar, k = float(self.sched.alpha_bar[t]), float(self.sched.k[t])
        A = math.sqrt(abar) + k * self.a(t)
        return A, A * M + k * self.b(t), A**2 * S**2 + 1 - abar

    def x0_fn(self, x, cond, t):
        A, mu, V = self.parts(int(t[0]))
        return M + A * S**2 / V * (x - mu)

    def adapter(self, x0, cond, t):
        return self.a(int(t[0])) * x0 + self.b(int(t[0]))

    def endpoint(self, x, t0, t1):
        (_, mu0, V0), (A1, mu1, V1) = self.parts(t0), self.parts(t1)
        return M + A1 * S**2 / V1 * (mu1 + (V1 / V0).sqrt() * (x - mu0) - mu1)


def log_sigma_grid(sched, n, sigma_max=80.0, sigma_min=0.05):
    """n integer steps whose sigmas are (to rounding) uniform in log sigma from sigma_max to sigma_min, then 0."""
    log_sigmas = (((1 - sched.alpha_bar[1:]) / sched.alpha_bar[1:]).sqrt()).log()
    targets = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    ts = (torch.searchsorted(log_sigmas, targets) + 1).tolist()
    assert len(set(ts)) == n
    return ts + [0]


def convergence(world, names, ns, adapter=True):
    """Max error against the exact endpoint for each solver and n, and the log-log slopes."""
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in names:
        errors[name] = []
        for n in ns:
            ts = log_sigma_grid(world.sched, n)
            _, mu0, V0 = world.parts(ts[0])
            x_start = mu0 + V0.sqrt() * x
            run = sample_ddim if name == "ddim" else (lambda *a, **kw: sample_solver(name, *a, **kw))  # noqa: B023
            out = run(world.x0_fn, x_start, ts, world.sched, adapter=world.adapter if adapter else None)
            errors[name].append((out - world.endpoint(x_start, ts[0], ts[-2])).abs().max().item())
    slopes = {name: [-math.log(e1 / e0) / math.log(n1 / n0) for e0, e1, n0, n1 in zip(e, e[1:], ns, ns[1:])]
              for name, e in errors.items()}
    return errors, slopes


def _table(title, ns, errors, slopes):
    print(f"\n{title}\n{'solver':10s}" + "".join(f"{'N=' + str(n):>11s}" for n in ns) + "   slopes (log err / log N)")
    for name in errors:
        row = "".join(f"{e:11.2e}" for e in errors[name])
        print(f"{name:10s}{row}   " + " ".join(f"{s:5.2f}" for s in slopes[name]))


def test_with_a_bias_that_ignores_x0_each_solver_converges_at_its_order():
    """r = b_t (any adapter that ignores x0): the translation y = x - k_t b_t is one fixed map, so each
    construction is the base solver on a standard diffusion, with its order; the errors equal the r = 0
    errors (the y-problem is the same)."""
    sched = make_schedule("cosine", T_FINE)
    world = GaussianWorld(sched, a=lambda t: 0.0, b=lambda t: 1.5 * math.cos(math.pi * t / T_FINE))
    names = ["ddim", "euler", "heun", "dpmpp-2m", "unipc"]
    ns = [16, 32, 64, 128]
    errors, slopes = convergence(world, names, ns)
    _table("r = 1.5 cos(pi t / T), exact x0 predictor, cosine T = 100000, grid uniform in log sigma (80 .. 0.05)",
           ns, errors, slopes)
    plain, _ = convergence(GaussianWorld(sched, a=lambda t: 0.0, b=lambda t: 0.0), names, ns, adapter=False)
    for name in names:
        assert errors[name] == pytest.approx(plain[name], rel=1e-6), name
    order = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp-2m": 2, "unipc": 3}  # UniPC-2 with its corrector: 3
    for name in names:
        assert all(abs(s - order[name]) < 0.15 * order[name] for s in slopes[name][1:]), (name, slopes[name])


def test_with_an_adapter_linear_in_x0_every_solver_converges_and_the_fast_ones_at_first_order():
    """r = a_t x0 + b_t: each step re-anchors the translation at its own prediction, and within a step
    the y-dynamics differ from the standard ones by a term proportional to x0_hat(t') - x0_hat(t)
    (docs/math.md, "What is and is not guaranteed"): an O(h^2) local error, so asymptotically every
    solver is first order. Measured here: heun/dpmpp-2m/unipc reach slope 0.88-0.99 by N = 256-1024,
    with errors 4.5x (N = 16) to 14x (N = 1024) below Euler's; at small N their own higher-order error
    dominates and the slope is steeper."""
    sched = make_schedule("cosine", T_FINE)
    world = GaussianWorld(sched, a=lambda t: 0.8 * math.sin(math.pi * t / T_FINE),
                          b=lambda t: 1.5 * math.cos(math.pi * t / T_FINE))
    names = ["ddim", "euler", "heun", "dpmpp-2m", "unipc"]
    ns = [16, 64, 256, 1024]
    errors, slopes = convergence(world, names, ns)
    _table("r = 0.8 sin(pi t / T) x0 + 1.5 cos(pi t / T), otherwise as above", ns, errors, slopes)
    for name in names:
        assert 0.8 < slopes[name][-1] < 1.2, (name, slopes[name])   # first order at the end
        assert errors[name][-1] < 1e-2, name                          # converging to the exact endpoint
    for name in ("heun", "dpmpp-2m", "unipc"):   # measured: >= 4.5x below Euler at every N, 14x at N = 1024
        assert all(e < e_euler / 3 for e, e_euler in zip(errors[name], errors["euler"])), name
        assert errors[name][-1] < errors["euler"][-1] / 10, name


# --------------------------------------------------------------------------- contracts and wiring


@pytest.mark.parametrize("name", list(SOLVERS))
def test_each_solver_keeps_the_data_dtype_and_reports_every_step(name):
    sched = make_schedule("cosine", 50)
    ticks = []

    class Progress:
        def advance(self):
            ticks.append(1)

    states = []
    cond = TextCondition(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 4))
    for karras in (False, True):
        states.clear()
        ticks.clear()
        x = torch.randn(2, 3, 8, 8)
        out = sample_solver(name, lambda x, c, t: 0.5 * x, x, timesteps_for(50, 6), sched,
                            adapter=lambda x0, c, t: 0.1 * x0 + c.pooled[:, :1, None, None], cond=cond, karras=karras,
                            generator=[torch.Generator().manual_seed(i) for i in range(2)],
                            callback=lambda **s: states.append(s), progress=Progress())
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert [s["step"] for s in states] == list(range(6)) and len(ticks) == 6
        assert states[0]["t"] == 50


def test_stochastic_solvers_make_each_sample_from_its_own_generator():
    sched = make_schedule("cosine", 50)
    x = torch.randn(3, 5, dtype=torch.float64)
    for name in ("euler-a", "dpmpp-2m-sde"):
        together = sample_solver(name, lambda x, c, t: 0.5 * x, x, timesteps_for(50, 8), sched,
                                 generator=[torch.Generator().manual_seed(i) for i in range(3)])
        alone = sample_solver(name, lambda x, c, t: 0.5 * x, x[1:2], timesteps_for(50, 8), sched,
                              generator=[torch.Generator().manual_seed(1)])
        assert torch.equal(together[1:2], alone), name


def test_run_sampler_dispatches_every_sampler_name_and_keeps_ddim_and_ddpm():
    sched = make_schedule("cosine", 40)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, c, t: torch.tanh(x)  # noqa: E731
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    ts = timesteps_for(40, 7)
    assert torch.equal(run_sampler(SampleConfig(sampler="ddim", steps=7), model, x, sched, 7, None, None, gens()),
                       sample_ddim(model, x, ts, sched, generator=gens()))
    assert torch.equal(run_sampler(SampleConfig(sampler="ddpm", steps=7), model, x, sched, 7, None, None, gens()),
                       sample_ddpm(model, x, ts, sched, generator=gens()))
    for sampler in SampleConfig.SAMPLERS[2:]:
        name = sampler.removesuffix("-karras")
        want = sample_solver(name, model, x, ts, sched, karras=sampler.endswith("-karras"), generator=gens())
        assert torch.equal(run_sampler(SampleConfig(sampler=sampler, steps=7), model, x, sched, 7, None, None, gens()),
                           want), sampler


def test_sampler_names_are_the_solvers_and_unknown_ones_name_a_close_match():
    assert SampleConfig.SOLVERS == tuple(SOLVERS)
    assert set(SampleConfig.SAMPLERS) == {"ddim", "ddpm", *SOLVERS, *(f"{s}-karras" for s in SOLVERS)}
    for typed, meant in [("dpm++2m", "dpmpp-2m"), ("DPM++ 2M Karras", "dpmpp-2m-karras"), ("euler_a", "euler-a"),
                         ("UniPC", "unipc")]:
        with pytest.raises(UsageError, match=f"sample.sampler .*did you mean '{meant}'"):
            from_dict(SampleConfig, {"sampler": typed}, "sample")
    params = SampleConfig()
    object.__setattr__(params, "sampler", "heun-karas")  # past the recipe's check: run_sampler says the same
    with pytest.raises(UsageError, match="did you mean 'heun-karras'"):
        run_sampler(params, lambda x, c, t: x, torch.zeros(1, 2), make_schedule("cosine", 10), 2, None, None, None)
    with pytest.raises(ValueError, match="unknown solver"):
        sample_solver("lms", lambda x, c, t: x, torch.zeros(1, 2), timesteps_for(10, 2), make_schedule("cosine", 10))


def test_zz_print_parity_table():
    """The r = 0 parity numbers of this run (pytest -s), max |ours - diffusers| over every network input and
    the output, float64 data against diffusers' float32 steps."""
    if PARITY:
        print("\nr = 0 parity with diffusers (max abs difference, VP scale):")
        for case, diff in PARITY.items():
            print(f"  {case:26s} {diff:.1e}")


def test_the_sd_wrapper_reads_fractional_steps_as_the_solvers_do():
    """Euler/Heun on Karras sigmas call the network between grid steps: the SD wrapper then reads
    abar at sigma_at(t) and gives the U-Net the fractional diffusers timestep t - 1."""
    from ctxdiff.diffusion.schedule import schedule_from_alpha_bar
    from ctxdiff.diffusion.solvers import sigma_at
    from ctxdiff.models.latent import EpsToX0

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
    taus = []

    class Unet(torch.nn.Module):
        def forward(self, x, tau, context):
            taus.append(tau)
            return torch.full_like(x, 0.3)

    x0_fn = EpsToX0(Unet(), abar, "epsilon")
    x = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    sched = schedule_from_alpha_bar(abar, "scaled_linear")
    for t in (500.0, 500.25, 731.9):
        a = 1 / (1 + sigma_at(sched, t) ** 2)
        expected = (1 - (1 - a) ** 0.5 * 0.3) / a ** 0.5
        got = x0_fn(x, torch.zeros(1, 3, 8), torch.tensor([t], dtype=torch.float64))
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10)
        assert float(taus[-1][0]) == pytest.approx(t - 1)
