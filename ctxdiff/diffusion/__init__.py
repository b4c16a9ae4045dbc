"""The contextualized diffusion core (ContextDiff Eq. 1-11): tensors and callables only."""

from ctxdiff.diffusion.likelihood import BitsPerDim, variational_bound
from ctxdiff.diffusion.process import (
    context_bias,
    ddim_invert_step,
    ddim_step,
    ddpm_step,
    diffusion_loss,
    loss_weights,
    predicted_noise,
    q_posterior,
    q_sample,
    q_transition,
    sample_timesteps,
)
from ctxdiff.diffusion.samplers import (
    classifier_free_guidance,
    invert_ddim,
    sample_ddim,
    sample_ddpm,
    timesteps_for,
)
from ctxdiff.diffusion.schedule import Schedule, make_schedule
from ctxdiff.diffusion.solvers import (
    SOLVERS,
    karras_sigmas,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_solver,
    sample_unipc,
    solver_grid,
)

__all__ = [
    "BitsPerDim", "SOLVERS", "Schedule", "classifier_free_guidance", "context_bias", "ddim_invert_step", "ddim_step",
    "ddpm_step", "diffusion_loss", "invert_ddim", "karras_sigmas", "loss_weights", "make_schedule",
    "predicted_noise", "q_posterior", "q_sample", "q_transition", "sample_ddim", "sample_ddpm",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "sample_solver", "sample_timesteps", "sample_unipc", "solver_grid", "timesteps_for", "variational_bound",
]
