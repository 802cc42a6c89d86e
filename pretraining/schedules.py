"""Noise schedules for the diffusion backbones: small plain objects, not modules.

In the style of diffusers' schedulers: a schedule owns its betas and cumulative
alphas, noises clean vectors (`add_noise`), chooses the steps of a (possibly
strided) reverse process (`set_timesteps`) and takes one reverse step from a
predicted clean vector (`step`, the x0-prediction parameterisation of DiffRec,
Eq. 3 and 11). Steps are 1-based: step n has abar_n = alphas_cumprod[n - 1], and
abar_0 = 1 (clean data). The denoiser never holds betas; a model rebuilds its
schedule from `to_config()` (a JSON-able dict with the schedule's name).

Cumulative alphas come from a continuous curve f(t), t in [0, 1], the way
Nichol & Dhariwal (2021) and DiffuSeq define them: beta_n = min(1 - f(n/N) /
f((n-1)/N), 0.999), abar_n = prod_{m<=n} (1 - beta_m), so abar_n = f(n/N) / f(0)
until a beta is clipped. For `sqrt`, f(t) = 1 - sqrt(t + 1e-4) (f(1) < 0, so the
last beta is clipped and abar_N is tiny but positive); for `cosine`,
f(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008. `linear` takes betas
evenly from 1e-4 to 0.02 (Ho et al., 2020); `truncated-linear` (DiffuSeq's `trunc_lin`,
which DiffuRec's and ADRec's code use) rescales that range to N steps and raises it by 0.01,
so that a short process (32 steps) still ends in almost pure noise.
"""

from __future__ import annotations

import math

import torch

MAX_BETA = 0.999


class NoiseSchedule:
    """Base class: subclasses define `name` and `_betas()` (float64 [N])."""

    name = ""

    def __init__(self, num_steps: int = 1000) -> None:
        if int(num_steps) != num_steps or num_steps < 2:
            raise ValueError(f"a noise schedule needs num_steps >= 2, got {num_steps}")
        self.num_steps = int(num_steps)
        betas = self._betas()
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()  # abar_1 .. abar_N
        # abar_0 = 1 in front, so index n gives abar_n for n = 0..N.
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64),
                                torch.cumprod(1.0 - betas, dim=0)])
        self._abar_on: dict[torch.device, torch.Tensor] = {}
        self.timesteps = torch.arange(self.num_steps, 0, -1)

    def _betas(self) -> torch.Tensor:
        raise NotImplementedError

    # -- forward process ------------------------------------------------------------------
    def abar(self, steps: torch.Tensor | int, device=None) -> torch.Tensor:
        """abar_n for 0-based-or-more steps n in 0..N (0 = clean), float32."""
        steps = torch.as_tensor(steps, device=device)
        table = self._abar_on.get(steps.device)
        if table is None:
            table = self._abar_on[steps.device] = self._abar.to(steps.device)
        return table[steps].float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_n) x0 + sqrt(1 - abar_n) noise; `steps` [B] (1..N) for x0 [B, ...]."""
        steps = torch.as_tensor(steps, device=x0.device)
        self._check_steps(steps)
        abar = self.abar(steps).to(x0.dtype)
        abar = abar.reshape(abar.shape + (1,) * (x0.dim() - abar.dim()))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    # -- reverse process ------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The reverse process's steps, from N down to 1 in `num_inference_steps` strides."""
        if not 1 <= num_inference_steps <= self.num_steps:
            raise ValueError(
                f"inference steps must be in 1..{self.num_steps} (the schedule's steps), "
                f"got {num_inference_steps}"
            )
        grid = torch.linspace(self.num_steps, 1, num_inference_steps, dtype=torch.float64)
        self.timesteps = grid.round().long()
        return self.timesteps

    def previous_step(self, n: int) -> int:
        """The step after `n` in the current `timesteps` (0 once the last is reached)."""
        later = self.timesteps[self.timesteps < n]
        return int(later[0]) if len(later) else 0

    def step(
        self,
        predicted_x0: torch.Tensor,
        n: int,
        x_n: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A sample of x_prev ~ q(x_prev | x_n, x0 = predicted_x0) (DDPM posterior, Eq. 3).

        x_prev is the step after `n` in `timesteps` (n - 1 for the full process); between
        strided steps the effective beta is 1 - abar_n / abar_prev. The last step (to 0)
        returns the prediction itself. `noise` (same shape as x_n) replaces the draw
        from `generator`.
        """
        n = int(n)
        if not 1 <= n <= self.num_steps:
            raise ValueError(f"step must be in 1..{self.num_steps}, got {n}")
        prev = self.previous_step(n)
        if prev == 0:
            return predicted_x0
        abar_n, abar_prev = self._abar[n].item(), self._abar[prev].item()
        beta = 1.0 - abar_n / abar_prev
        coef_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar_n)
        coef_xn = math.sqrt(abar_n / abar_prev) * (1.0 - abar_prev) / (1.0 - abar_n)
        variance = (1.0 - abar_prev) / (1.0 - abar_n) * beta
        mean = coef_x0 * predicted_x0 + coef_xn * x_n
        if noise is None:
            noise = torch.randn(x_n.shape, generator=generator, dtype=x_n.dtype,
                                device=generator.device if generator is not None else x_n.device)
        return mean + math.sqrt(variance) * noise.to(x_n.device, x_n.dtype)

    # -- config ---------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {"name": self.name, "num_steps": self.num_steps}

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        config = dict(config)
        name = config.pop("name", cls.name)
        if cls is NoiseSchedule:
            return build_schedule(name, **config)
        if name != cls.name:
            raise ValueError(f"a {name!r} schedule config cannot build a {cls.name!r} schedule")
        return cls(**config)

    def _check_steps(self, steps: torch.Tensor) -> None:
        # Checked on CPU only: on an accelerator it would cost a host sync per call.
        if steps.device.type != "cpu" or not steps.numel():
            return
        if int(steps.min()) < 1 or int(steps.max()) > self.num_steps:
            raise ValueError(f"diffusion steps must be in 1..{self.num_steps}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps})"


def _betas_from_curve(curve, num_steps: int) -> torch.Tensor:
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = curve(t)
    return (1.0 - f[1:] / f[:-1]).clamp(max=MAX_BETA)


class SqrtSchedule(NoiseSchedule):
    """abar(t) = 1 - sqrt(t + 1e-4) (Li et al., 2022, Diffusion-LM; DiffRec's default)."""

    name = "sqrt"

    @staticmethod
    def curve(t: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.sqrt(t + 1e-4)

    def _betas(self) -> torch.Tensor:
        return _betas_from_curve(self.curve, self.num_steps)


class CosineSchedule(NoiseSchedule):
    """abar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008 (Nichol & Dhariwal, 2021)."""

    name = "cosine"
    offset = 0.008

    @classmethod
    def curve(cls, t: torch.Tensor) -> torch.Tensor:
        return torch.cos((t + cls.offset) / (1 + cls.offset) * math.pi / 2) ** 2

    def _betas(self) -> torch.Tensor:
        return _betas_from_curve(self.curve, self.num_steps)


class LinearSchedule(NoiseSchedule):
    """beta_n evenly spaced from 1e-4 to 0.02 (Ho et al., 2020)."""

    name = "linear"
    beta_start, beta_end = 1e-4, 0.02

    def _betas(self) -> torch.Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.num_steps,
                              dtype=torch.float64)


class TruncatedLinearSchedule(NoiseSchedule):
    """beta_n evenly spaced from 1e-4 s + 0.01 to 0.02 s + 0.01, s = 1000 / N: the linear
    range stretched to N steps, every beta at least 0.01 (DiffuSeq's `trunc_lin`). Where
    0.02 s + 0.01 would pass 1 (N < 21) the end is 0.001 s + 0.01 instead, as there."""

    name = "truncated-linear"
    floor = 0.01

    def _betas(self) -> torch.Tensor:
        stretch = 1000 / self.num_steps
        end = 0.02 * stretch + self.floor
        if end > 1:
            end = 0.001 * stretch + self.floor
        return torch.linspace(1e-4 * stretch + self.floor, end, self.num_steps,
                              dtype=torch.float64).clamp(max=MAX_BETA)


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    "sqrt": SqrtSchedule, "cosine": CosineSchedule, "linear": LinearSchedule,
    "truncated-linear": TruncatedLinearSchedule,
}


def build_schedule(name: str, num_steps: int = 1000) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_steps)
