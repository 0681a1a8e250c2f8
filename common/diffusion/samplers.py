"""Host-side (numpy) samplers for Stable Diffusion, shared by both backends.

Each sampler reproduces the timestep choice and the update arithmetic of the diffusers scheduler of
the same name, configured the way Stable Diffusion's scheduler_config configures it
(scaled_linear betas 0.00085..0.012, steps_offset 1, "leading" timestep spacing, set_alpha_to_one
False, clip_sample False; everything else at that scheduler's diffusers defaults, e.g. no Karras
sigmas and a final sigma of zero). The backend only evaluates the model; every other number is
computed here, so one seed gives one image on PyTorch and MindSpore alike.

Precision: update arithmetic and the samplers' history (multistep buffers) are float64, so the host
adds no rounding of its own beyond diffusers' float32; every array handed back (latents, scaled
model inputs) is float32, the dtype the models consume.
"""
from __future__ import annotations

import abc
from typing import Callable, List, Optional, Tuple

import numpy as np

from common.errors import UserError
from common.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddim", "plms", "dpm_solver_pp", "euler", "euler_ancestral", "unipc")

STEPS_OFFSET = 1   # SD's scheduler_config: shifts "leading" timesteps up by one


def guided(uncond: np.ndarray, cond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: uncond + scale * (cond - uncond), float32."""
    uncond = np.asarray(uncond, dtype=np.float32)
    return uncond + np.float32(scale) * (np.asarray(cond, dtype=np.float32) - uncond)


def _leading(num_train: int, num_steps: int, divisions: int) -> np.ndarray:
    """diffusers' "leading" spacing: multiples of num_train // divisions, descending, + steps_offset.

    DDIM/PNDM/Euler use divisions = num_steps; DPM-Solver/UniPC use num_steps + 1 and drop the
    smallest (t = 0) entry, which is what the slice below does in both cases.
    """
    ratio = num_train // divisions
    return (np.arange(divisions, dtype=np.int64) * ratio)[::-1][:num_steps] + STEPS_OFFSET


def _alpha_sigma(sigma: float) -> Tuple[float, float]:
    """k-diffusion sigma (sqrt((1-ac)/ac)) -> (sqrt(ac), sqrt(1-ac))."""
    alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


class Sampler(abc.ABC):
    """One sampling run (stateful, like a diffusers scheduler): make a fresh one per image batch.

    Steps must be taken in order i = 0, 1, ..., len(timesteps) - 1.
    """

    name = ""
    init_noise_sigma = 1.0
    needs_noise = False

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        self.schedule = schedule
        self.num_steps = num_steps
        self.v_prediction = schedule.parameterization == "v"
        self.ac = schedule.alphas_cumprod
        self.timesteps = self._make_timesteps()
        if self.timesteps.max() >= schedule.num_train_timesteps:
            raise UserError(f"{num_steps} sampling steps are too many for sampler {self.name!r} "
                            f"with {schedule.num_train_timesteps} training timesteps")
        self._next = 0

    def _make_timesteps(self) -> np.ndarray:
        return _leading(self.schedule.num_train_timesteps, self.num_steps, self.num_steps)

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """The model's input at step i (identity except for the sigma-space samplers)."""
        return np.asarray(x, dtype=np.float32)

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray,
             noise: Optional[np.ndarray] = None) -> np.ndarray:
        """Advance latents ``x`` past step i given the model's output there; returns float32."""
        if i != self._next:
            raise ValueError(f"{self.name}: step {i} taken out of order (expected step {self._next})")
        if self.needs_noise and noise is None:
            raise ValueError(f"{self.name}: step() needs fresh noise")
        self._next += 1
        out = np.asarray(model_output, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        noise = None if noise is None else np.asarray(noise, dtype=np.float64)
        return self._step(out, i, x, noise).astype(np.float32)

    @abc.abstractmethod
    def _step(self, out, i, x, noise):
        """One step of this sampler's update rule (float64 in, float64 out)."""

    def _alpha_prev(self, t: int) -> float:
        # set_alpha_to_one=False: the step past t=0 lands on alphas_cumprod[0], not 1.
        return self.ac[t] if t >= 0 else self.ac[0]


class DDIMSampler(Sampler):
    """diffusers DDIMScheduler (eta=0 deterministic DDIM; eta=1 DDPM-like ancestral noise)."""

    name = "ddim"

    def __init__(self, schedule, num_steps, eta=0.0):
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        super().__init__(schedule, num_steps)

    def _step(self, out, i, x, noise):
        t = int(self.timesteps[i])
        a_t = self.ac[t]
        a_prev = self._alpha_prev(t - self.schedule.num_train_timesteps // self.num_steps)
        if self.v_prediction:
            x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
            eps = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
        else:
            x0 = (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
            eps = out
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * np.sqrt(variance)
        x_prev = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - std ** 2) * eps
        if self.eta > 0:
            x_prev = x_prev + std * noise
        return x_prev


class PLMSSampler(Sampler):
    """diffusers PNDMScheduler(skip_prk_steps=True): linear multistep on eps, num_steps + 1 model calls.

    The second model call repeats the second timestep: it is a Heun-style correction of the first
    step (average of the first two outputs, restarted from the first sample).
    """

    name = "plms"

    def __init__(self, schedule, num_steps):
        super().__init__(schedule, num_steps)
        self.ratio = schedule.num_train_timesteps // num_steps
        self.ets: List[np.ndarray] = []
        self.cur_sample = None

    def _make_timesteps(self):
        asc = _leading(self.schedule.num_train_timesteps, self.num_steps, self.num_steps)[::-1]
        return np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].copy()

    def _step(self, out, i, x, noise):
        t = int(self.timesteps[i])
        prev = t - self.ratio
        if i != 1:
            self.ets = self.ets[-3:] + [out]
        else:
            # The repeated timestep: redo the first step from its start sample.
            prev, t = t, t + self.ratio
        ets = self.ets
        if i == 0:
            combined = out
            self.cur_sample = x
        elif i == 1:
            combined = (out + ets[-1]) / 2
            x = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            combined = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            combined = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            combined = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        return self._prev_sample(x, t, prev, combined)

    def _prev_sample(self, x, t, prev, out):
        """PNDM's transfer x_t -> x_prev (eq. 9 of Liu et al. 2022) for an eps estimate ``out``."""
        a_t, a_prev = self.ac[t], self._alpha_prev(prev)
        if self.v_prediction:
            out = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
        denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
        return np.sqrt(a_prev / a_t) * x - (a_prev - a_t) * out / denom


class _SigmaSampler(Sampler):
    """Shared by samplers working with k-diffusion sigmas sqrt((1-ac)/ac) and a final sigma of 0."""

    def __init__(self, schedule, num_steps):
        super().__init__(schedule, num_steps)
        sig = np.sqrt((1 - self.ac) / self.ac)[self.timesteps]
        self.sigmas = np.concatenate([sig, [0.0]])

    def _x0(self, out, x, i):
        """Data prediction from the model output, for DDPM-scale latents x (DPM-Solver, UniPC)."""
        alpha, sigma = _alpha_sigma(self.sigmas[i])
        if self.v_prediction:
            return alpha * x - sigma * out
        return (x - sigma * out) / alpha

    def _lambda(self, i):
        """log-SNR / 2 = log(alpha) - log(sigma) at sigma index i."""
        alpha, sigma = _alpha_sigma(self.sigmas[i])
        return np.log(alpha) - np.log(sigma)


class DPMSolverPPSampler(_SigmaSampler):
    """diffusers DPMSolverMultistepScheduler, dpmsolver++ 2M (midpoint), first order at both ends."""

    name = "dpm_solver_pp"

    def __init__(self, schedule, num_steps):
        super().__init__(schedule, num_steps)
        self.history: List[np.ndarray] = []

    def _make_timesteps(self):
        return _leading(self.schedule.num_train_timesteps, self.num_steps, self.num_steps + 1)

    def _step(self, out, i, x, noise):
        x0 = self._x0(out, x, i)
        self.history = self.history[-1:] + [x0]
        if self.sigmas[i + 1] == 0:
            return x0   # first-order update into sigma 0 is exactly the data prediction
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        _, sigma_s0 = _alpha_sigma(self.sigmas[i])
        h = self._lambda(i + 1) - self._lambda(i)
        x_t = sigma_t / sigma_s0 * x - alpha_t * np.expm1(-h) * x0
        if len(self.history) == 2:
            r0 = (self._lambda(i) - self._lambda(i - 1)) / h
            d1 = (self.history[1] - self.history[0]) / r0
            x_t = x_t - 0.5 * alpha_t * np.expm1(-h) * d1
        return x_t


class EulerSampler(_SigmaSampler):
    """diffusers EulerDiscreteScheduler (k-diffusion Euler, no churn)."""

    name = "euler"

    def __init__(self, schedule, num_steps):
        super().__init__(schedule, num_steps)
        # "leading" spacing never reaches t = T - 1, so diffusers starts from the largest used sigma
        # on the DDPM scale: sqrt(sigma_max^2 + 1).
        self.init_noise_sigma = float(np.sqrt(self.sigmas.max() ** 2 + 1))

    def scale_model_input(self, x, i):
        return (np.asarray(x, dtype=np.float64) / np.sqrt(self.sigmas[i] ** 2 + 1)).astype(np.float32)

    def _denoised(self, out, x, sigma):
        """Data prediction for sigma-scale latents x."""
        if self.v_prediction:
            return out * (-sigma / np.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
        return x - sigma * out

    def _step(self, out, i, x, noise):
        sigma = self.sigmas[i]
        derivative = (x - self._denoised(out, x, sigma)) / sigma
        return x + derivative * (self.sigmas[i + 1] - sigma)


class EulerAncestralSampler(EulerSampler):
    """diffusers EulerAncestralDiscreteScheduler: Euler to sigma_down, then fresh noise * sigma_up."""

    name = "euler_ancestral"
    needs_noise = True

    def _step(self, out, i, x, noise):
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        sigma_up = np.sqrt(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2)
        sigma_down = np.sqrt(sigma_to ** 2 - sigma_up ** 2)
        derivative = (x - self._denoised(out, x, sigma)) / sigma
        return x + derivative * (sigma_down - sigma) + noise * sigma_up


class UniPCSampler(_SigmaSampler):
    """diffusers UniPCMultistepScheduler: bh2, order 2, data prediction, predictor + corrector.

    At step i the corrector first refines the sample reached by step i-1's predictor with the new
    model output (UniC), then the predictor (UniP) moves on; order drops to 1 at the first and last
    steps, as diffusers does with lower_order_final.
    """

    name = "unipc"
    order = 2

    def __init__(self, schedule, num_steps):
        super().__init__(schedule, num_steps)
        self.history: List[np.ndarray] = []   # data predictions, newest last
        self.last_sample = None
        self.this_order = 1

    def _make_timesteps(self):
        return _leading(self.schedule.num_train_timesteps, self.num_steps, self.num_steps + 1)

    def _step(self, out, i, x, noise):
        x0 = self._x0(out, x, i)
        if i > 0 and self.last_sample is not None:
            x = self._correct(x0, self.last_sample, i, self.this_order)
        self.history = self.history[-(self.order - 1):] + [x0]
        self.this_order = min(self.order, len(self.timesteps) - i, i + 1)
        self.last_sample = x
        return self._predict(x, i, self.this_order)

    def _predict(self, x, i, order):
        m0 = self.history[-1]
        if self.sigmas[i + 1] == 0:
            return m0   # the order-1 update into sigma 0 is exactly the data prediction
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        _, sigma_s0 = _alpha_sigma(self.sigmas[i])
        h = self._lambda(i + 1) - self._lambda(i)
        h_phi_1 = np.expm1(-h)
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = (self._lambda(i - 1) - self._lambda(i)) / h
            d1 = (self.history[-2] - m0) / rk
            x_t = x_t - alpha_t * h_phi_1 * 0.5 * d1   # B(h) = expm1(-h) for bh2; rho_p = 1/2
        return x_t

    def _correct(self, model_t, x, i, order):
        """UniC: refine the step (i-1 -> i) that produced the current sample, using model_t at i."""
        m0 = self.history[-1]
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i])
        _, sigma_s0 = _alpha_sigma(self.sigmas[i - 1])
        h = self._lambda(i) - self._lambda(i - 1)
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = h_phi_1   # bh2
        rks, d1s = [], []
        if order == 2:
            rk = (self._lambda(i - 2) - self._lambda(i - 1)) / h
            rks.append(rk)
            d1s.append((self.history[-2] - m0) / rk)
        rks.append(1.0)
        if order == 1:
            rhos_c = np.array([0.5])
        else:
            # Solve R rho = b with R[k] = rks**k and b[k] = k! * phi_{k+1}(hh) / B(h).
            h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
            for k in range(1, order + 1):
                b.append(h_phi_k * factorial / b_h)
                factorial *= k + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            r = np.stack([np.power(rks, k - 1) for k in range(1, order + 1)])
            rhos_c = np.linalg.solve(r, np.array(b))
        corr = sum(rho * d for rho, d in zip(rhos_c[:-1], d1s))
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        return x_t - alpha_t * b_h * (corr + rhos_c[-1] * (model_t - m0))


_CLASSES = {c.name: c for c in (DDIMSampler, PLMSSampler, DPMSolverPPSampler, EulerSampler,
                                  EulerAncestralSampler, UniPCSampler)}


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0) -> Sampler:
    """A fresh sampler ``name`` (one of SAMPLERS) for ``num_steps`` steps; eta applies to ddim only."""
    if name not in _CLASSES:
        raise UserError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise UserError(f"number of sampling steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if eta < 0:
        raise UserError(f"eta must be >= 0, got {eta}")
    if name == "ddim":
        return DDIMSampler(schedule, num_steps, eta)
    if eta != 0:
        raise UserError(f"eta only applies to the ddim sampler, not {name!r}")
    return _CLASSES[name](schedule, num_steps)


def denoise(model_fn: Callable[[np.ndarray, int], np.ndarray], x_T: np.ndarray, sampler: Sampler,
            noise_fn: Optional[Callable[[int, tuple], np.ndarray]] = None,
            progress: bool = True) -> np.ndarray:
    """The one sampling loop both backends use; returns the final latents (float32).

    model_fn(x_in, t) evaluates the (guided) model on float32 latents at integer timestep t and
    returns its output like x_in. x_T is standard-normal noise; it is scaled by
    sampler.init_noise_sigma here. noise_fn(i, shape) supplies the fresh noise of step i and is
    called only when sampler.needs_noise.
    """
    from tqdm import tqdm

    if sampler.needs_noise and noise_fn is None:
        raise ValueError(f"sampler {sampler.name!r} needs noise_fn for its per-step noise")
    x = (np.asarray(x_T, dtype=np.float64) * sampler.init_noise_sigma).astype(np.float32)
    for i, t in enumerate(tqdm(sampler.timesteps, desc=sampler.name, disable=not progress)):
        x_in = sampler.scale_model_input(x, i)
        out = model_fn(x_in, int(t))
        noise = noise_fn(i, x.shape) if sampler.needs_noise else None
        x = sampler.step(out, i, x, noise)
    return x
