"""The DDPM noise schedule in numpy: betas, cumulative alphas, forward noising and training targets.

Both backends take their schedule numbers from here, so training noise and sampling arithmetic agree
bit for bit across PyTorch and MindSpore. Tables are computed in float64 (as the original LDM code
does) and handed out as float32 where a model or a loss consumes them.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from common.arch import ScheduleArch
from common.errors import UserError

# Names the yaml may use for SD's schedule: LDM calls it "linear", diffusers "scaled_linear".
_SCALED_LINEAR = ("linear", "scaled_linear")
_PARAMETERIZATIONS = ("eps", "v")


class NoiseSchedule:
    """Stable Diffusion's training noise schedule.

    Attributes:
        betas, alphas_cumprod: float64 arrays of length ``num_train_timesteps``.
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: float32 copies, for a backend that wants
            the whole table on its device.
        num_train_timesteps: T.
        parameterization: "eps" (the model predicts the noise) or "v" (it predicts the velocity).
    """

    def __init__(self, sched: ScheduleArch):
        if sched.beta_schedule not in _SCALED_LINEAR:
            raise UserError(f"model.params.beta_schedule: {sched.beta_schedule!r} is not supported "
                            f"(only 'linear', Stable Diffusion's schedule)")
        if sched.parameterization not in _PARAMETERIZATIONS:
            raise UserError(f"model.params.parameterization: {sched.parameterization!r} is not supported "
                            f"(use 'eps' or 'v')")
        if sched.timesteps < 2:
            raise UserError(f"model.params.timesteps: must be at least 2, got {sched.timesteps}")
        self.num_train_timesteps = int(sched.timesteps)
        self.parameterization = sched.parameterization
        # LDM "linear" is linear in sqrt(beta).
        self.betas = np.linspace(np.sqrt(sched.linear_start), np.sqrt(sched.linear_end),
                                 self.num_train_timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod).astype(np.float32)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod).astype(np.float32)

    def _index(self, t) -> np.ndarray:
        t = np.asarray(t)
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got {t.min()}..{t.max()}")
        return t.astype(np.int64)

    def coefficients(self, t) -> Tuple[np.ndarray, np.ndarray]:
        """sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]) as float32 arrays shaped like ``t``."""
        t = self._index(t)
        return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]

    def snr(self, t) -> np.ndarray:
        """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) per timestep (float32)."""
        ac = self.alphas_cumprod[self._index(t)]
        return (ac / (1.0 - ac)).astype(np.float32)

    def min_snr_weights(self, t, gamma: float) -> np.ndarray:
        """Min-SNR-gamma loss weight per sample (Hang et al. 2023), as diffusers' training scripts use it.

        The weight rescales the plain MSE on the model's own target: min(snr, gamma) / snr for an eps
        model, min(snr, gamma) / (snr + 1) for a v model. float32, shaped like ``t``.
        """
        if gamma <= 0:
            raise UserError(f"snr_gamma must be positive, got {gamma}")
        ac = self.alphas_cumprod[self._index(t)]
        snr = ac / (1.0 - ac)
        clipped = np.minimum(snr, float(gamma))
        weights = clipped / snr if self.parameterization == "eps" else clipped / (snr + 1.0)
        return weights.astype(np.float32)

    def _broadcast(self, coef: np.ndarray, like: np.ndarray) -> np.ndarray:
        """[B] -> [B, 1, 1, ...] so a per-sample coefficient scales a whole latent."""
        return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        """Forward diffusion q(x_t | x_0): sqrt(ac) * x0 + sqrt(1 - ac) * noise (float32)."""
        x0 = np.asarray(x0, dtype=np.float32)
        a, s = self.coefficients(t)
        return self._broadcast(a, x0) * x0 + self._broadcast(s, x0) * np.asarray(noise, dtype=np.float32)

    def velocity(self, x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        """v-prediction target: sqrt(ac) * noise - sqrt(1 - ac) * x0 (float32)."""
        x0 = np.asarray(x0, dtype=np.float32)
        a, s = self.coefficients(t)
        return self._broadcast(a, x0) * np.asarray(noise, dtype=np.float32) - self._broadcast(s, x0) * x0

    def training_target(self, x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        """What the model is trained to output at x_t: the noise (eps) or the velocity (v)."""
        if self.parameterization == "eps":
            return np.asarray(noise, dtype=np.float32)
        return self.velocity(x0, noise, t)
