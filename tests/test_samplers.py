"""Parity of common.diffusion.samplers with the diffusers schedulers configured as Stable Diffusion's.

Both sides are driven by the same model: an oracle denoiser for a fixed clean latent plus a fixed
random perturbation per step, a linear function of (x, t), so any divergence in state compounds.

The strict (1e-5) comparison gives our samplers diffusers' own alphas_cumprod table, so it tests the
sampler arithmetic alone. diffusers builds that table with a float32 cumprod (relative error up to
~1e-6, which is ~5e-4 relative in 1 - alphas_cumprod near t = 0); our NoiseSchedule uses float64,
so with our real table the results differ by that much more, checked at a looser tolerance.
"""
import numpy as np
import pytest
import torch

from common.arch import ScheduleArch
from common.errors import UserError
from common.diffusion.samplers import SAMPLERS, denoise, guided, make_sampler
from common.diffusion.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

SHAPE = (2, 4, 8, 8)
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
DIFFUSERS = {
    "ddim": (diffusers.DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False)),
    "plms": (diffusers.PNDMScheduler, dict(skip_prk_steps=True, set_alpha_to_one=False)),
    "dpm_solver_pp": (diffusers.DPMSolverMultistepScheduler,
                      dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
}
PRED = {"eps": "epsilon", "v": "v_prediction"}


# What every diffusers scheduler here computes for SD's betas (float32 linspace and cumprod).
DIFFUSERS_AC = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       ).alphas_cumprod.double().numpy()


def _schedule(param, tables="ours"):
    schedule = NoiseSchedule(ScheduleArch(parameterization=param))
    if tables == "diffusers":
        schedule.alphas_cumprod = DIFFUSERS_AC.copy()
    return schedule


class Model:
    """Ideal eps/v for clean latent x0 given DDPM-scale input x_in, plus 0.1 * fixed noise per call."""

    def __init__(self, schedule, num_calls):
        rng = np.random.default_rng(1234)
        self.ac = schedule.alphas_cumprod
        self.param = schedule.parameterization
        self.x0 = rng.standard_normal(SHAPE)
        self.wobble = 0.1 * rng.standard_normal((num_calls,) + SHAPE)
        self.calls = 0

    def __call__(self, x_in, t):
        a = self.ac[int(t)]
        eps = (np.asarray(x_in, np.float64) - np.sqrt(a) * self.x0) / np.sqrt(1 - a)
        out = eps if self.param == "eps" else np.sqrt(a) * eps - np.sqrt(1 - a) * self.x0
        out = out + self.wobble[self.calls]
        self.calls += 1
        return out.astype(np.float32)


def _noises(n):
    return np.random.default_rng(99).standard_normal((n,) + SHAPE).astype(np.float32)


def assert_close(x, ref, tol):
    """Max abs difference <= tol on unit-scale data (tol times the reference's scale when larger)."""
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64)).max())
    assert err <= tol * scale, f"max abs difference {err:.3g} > {tol:g} * {scale:.3g}"


def run_ours(name, param, steps, eta=0.0, tables="diffusers"):
    sampler = make_sampler(name, _schedule(param, tables), steps, eta=eta)
    n = len(sampler.timesteps)
    model, noises = Model(_schedule(param), n), _noises(n)
    x_T = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    inputs = []

    def model_fn(x_in, t):
        inputs.append(x_in)
        return model(x_in, t)

    x = denoise(model_fn, x_T, sampler, noise_fn=lambda i, shape: noises[i], progress=False)
    return sampler, inputs, x


def run_diffusers(name, param, steps, monkeypatch, eta=0.0):
    cls, extra = DIFFUSERS[name]
    sched = cls(**SD_CONFIG, **extra, prediction_type=PRED[param])
    sched.set_timesteps(steps)
    n = len(sched.timesteps)
    model, noises = Model(_schedule(param), n), _noises(n)
    # EulerAncestral draws its noise inside step(): hand it ours, in order.
    drawn = iter(torch.from_numpy(noises))
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda shape, **kw: next(drawn))
    latents = torch.from_numpy(np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32))
    latents = latents * sched.init_noise_sigma
    inputs = []
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(latents, t)
        inputs.append(x_in.numpy())
        out = torch.from_numpy(model(x_in.numpy(), int(t)))
        kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noises[i])) if name == "ddim" else {}
        latents = sched.step(out, t, latents, **kwargs).prev_sample
    return sched, inputs, latents.numpy()


CASES = [(name, param, steps) for name in SAMPLERS for param in ("eps", "v") for steps in (1, 2, 10, 25)]


@pytest.mark.parametrize("name,param,steps", CASES)
def test_matches_diffusers(name, param, steps, monkeypatch):
    ours, our_inputs, x = run_ours(name, param, steps)
    ref, ref_inputs, x_ref = run_diffusers(name, param, steps, monkeypatch)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    # float64 schedule vs diffusers' float32 cumprod: agree to float32 precision.
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert len(our_inputs) == len(ref_inputs)
    for a, b in zip(our_inputs, ref_inputs):
        assert a.dtype == np.float32
        assert_close(a, b, 1e-5)
    assert x.dtype == np.float32 and x.shape == SHAPE
    assert_close(x, x_ref, 1e-5)


@pytest.mark.parametrize("name,param,steps", [c for c in CASES if c[2] >= 10])
def test_close_to_diffusers_with_float64_schedule(name, param, steps, monkeypatch):
    ours, _, x = run_ours(name, param, steps, tables="ours")
    ref, _, x_ref = run_diffusers(name, param, steps, monkeypatch)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert_close(x, x_ref, 1e-4)


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_ddim_eta_matches_diffusers(param, steps, monkeypatch):
    # (A single step from t=1 is left out: diffusers' float32 variance there, (1-a_prev)/(1-a_t) *
    # (1 - a_t/a_prev) with a ~ 0.999, cancels to ~1e-4 relative, past the tolerance.)
    ours, _, x = run_ours("ddim", param, steps, eta=1.0)
    assert ours.needs_noise
    _, _, x_ref = run_diffusers("ddim", param, steps, monkeypatch, eta=1.0)
    assert_close(x, x_ref, 1e-5)
    # The noise matters: a different noise stream gives a different result.
    _, _, x_eta0 = run_ours("ddim", param, steps, eta=0.0)
    assert np.abs(x - x_eta0).max() > 1e-3


def test_scale_model_input_on_same_latents():
    for name in SAMPLERS:
        cls, extra = DIFFUSERS[name]
        ref = cls(**SD_CONFIG, **extra)
        ref.set_timesteps(10)
        ours = make_sampler(name, _schedule("eps"), 10)
        x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 10
        for i, t in enumerate(ref.timesteps[:3]):
            if hasattr(ref, "_step_index"):
                ref._step_index = i   # as if steps 0..i-1 had been taken
            np.testing.assert_allclose(ours.scale_model_input(x, i),
                                       ref.scale_model_input(torch.from_numpy(x), t).numpy(),
                                       rtol=1e-6, atol=0)


def test_needs_noise_flags():
    s = _schedule("eps")
    flags = {name: make_sampler(name, s, 5).needs_noise for name in SAMPLERS}
    assert flags == {n: n == "euler_ancestral" for n in SAMPLERS}
    assert make_sampler("ddim", s, 5, eta=0.5).needs_noise


def test_denoise_noise_fn_usage():
    s = _schedule("eps")
    calls = []

    def noise_fn(i, shape):
        calls.append(i)
        return np.zeros(shape, np.float32)

    model = lambda x, t: np.zeros_like(x)   # noqa: E731
    x_T = np.ones((1, 4, 2, 2), np.float32)
    denoise(model, x_T, make_sampler("euler", s, 4), noise_fn=noise_fn, progress=False)
    assert calls == []
    denoise(model, x_T, make_sampler("euler_ancestral", s, 4), noise_fn=noise_fn, progress=False)
    assert calls == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="noise"):
        denoise(model, x_T, make_sampler("euler_ancestral", s, 4), progress=False)


def test_steps_must_be_in_order():
    sampler = make_sampler("dpm_solver_pp", _schedule("eps"), 5)
    x = np.zeros(SHAPE, np.float32)
    sampler.step(x, 0, x)
    with pytest.raises(ValueError, match="order"):
        sampler.step(x, 2, x)


def test_guided():
    u = np.array([1.0, 2.0], np.float32)
    c = np.array([3.0, 0.0], np.float32)
    out = guided(u, c, 7.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [16.0, -13.0])
    np.testing.assert_array_equal(guided(u, c, 1.0), c)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(UserError) as e:
        make_sampler("k_lms", _schedule("eps"), 10)
    for name in SAMPLERS:
        assert name in str(e.value)
    assert "k_lms" in str(e.value)


@pytest.mark.parametrize("kwargs", [dict(num_steps=0), dict(num_steps=2.5), dict(num_steps=1000),
                                    dict(num_steps=10, eta=-1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(UserError):
        make_sampler("ddim", _schedule("eps"), **kwargs)


def test_eta_only_for_ddim():
    with pytest.raises(UserError, match="eta"):
        make_sampler("euler", _schedule("eps"), 10, eta=0.5)
