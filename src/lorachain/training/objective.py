"""The training objective of the denoiser's family, with every draw from the step generator.

* U-Nets (:class:`DenoisingObjective`): DDPM noising ``add_noise`` at a uniform timestep, the
  target epsilon (or v under ``prediction_type: v_prediction``), plain MSE.
* Diffusion transformers (:class:`FlowMatchingObjective`, SD3 and FLUX): rectified flow as
  diffusers' train_dreambooth_lora_sd3.py / _flux.py train it. A timestep density ``u`` (diffusers'
  ``compute_density_for_timestep_sampling``: logit-normal by default, or mode / uniform) picks an
  index of the scheduler's training schedule; x_t = (1 - sigma) x0 + sigma eps; the target is
  eps - x0; the loss is the per-sample mean of ``compute_loss_weighting_for_sd3``-weighted squared
  errors (1 for logit_normal / mode / none), averaged over the batch.
"""

from __future__ import annotations

from lorachain.torch_env import torch
from lorachain.training.config import FlowMatchingConfig


class DenoisingObjective:
    """Epsilon- or v-prediction with the pipeline's DDPM schedule (SD 1.x, SDXL)."""

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)

    def draw_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)

    def noisy_and_target(self, latents, noise, timesteps):
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(latents, noise, timesteps), timesteps
        return noisy, noise, timesteps

    def noisy_at(self, latents, noise, level: int):
        """The noised latents at one training timestep (the layer-input recorder's levels)."""
        timesteps = torch.full((len(latents),), int(level), dtype=torch.long, device=latents.device)
        return self.noisy_and_target(latents, noise, timesteps)[0], timesteps

    @property
    def levels(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def loss(self, prediction, target, timesteps):
        return torch.nn.functional.mse_loss(prediction.float(), target.float())


class FlowMatchingObjective:
    """Rectified flow on the pipeline's flow-matching schedule (SD3, FLUX)."""

    def __init__(self, scheduler_config, options: FlowMatchingConfig):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.options = options

    @property
    def levels(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def draw_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Indices into the training schedule, drawn with the configured density."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        options = self.options
        u = compute_density_for_timestep_sampling(
            weighting_scheme=options.weighting_scheme,
            batch_size=batch,
            logit_mean=options.logit_mean,
            logit_std=options.logit_std,
            mode_scale=options.mode_scale,
            generator=generator,
        )
        return (u * self.levels).long().clamp(max=self.levels - 1)

    def _sigmas(self, indices, ndim: int, device):
        sigmas = self.scheduler.sigmas.to(device)[indices.to(device)]
        return sigmas.reshape(-1, *([1] * (ndim - 1)))

    def noisy_and_target(self, latents, noise, indices):
        sigmas = self._sigmas(indices, latents.ndim, latents.device)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        timesteps = self.scheduler.timesteps.to(latents.device)[indices.to(latents.device)]
        return noisy, noise - latents, timesteps

    def noisy_at(self, latents, noise, level: int):
        indices = torch.full((len(latents),), int(level), dtype=torch.long)
        noisy, _, timesteps = self.noisy_and_target(latents, noise, indices)
        return noisy, timesteps

    def loss(self, prediction, target, timesteps):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = (timesteps.float() / self.levels).reshape(-1, *([1] * (prediction.ndim - 1)))
        weighting = compute_loss_weighting_for_sd3(self.options.weighting_scheme, sigmas)
        squared = weighting.float() * (prediction.float() - target.float()) ** 2
        return squared.reshape(len(target), -1).mean(dim=1).mean()


def objective_of(family, scheduler_config, flow_matching: FlowMatchingConfig):
    """The objective a denoiser family is trained with."""
    if family.flow_matching:
        return FlowMatchingObjective(scheduler_config, flow_matching)
    return DenoisingObjective(scheduler_config)
