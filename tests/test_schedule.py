"""common.diffusion.schedule against diffusers' DDPMScheduler and compute_snr (float32 there, float64 here)."""
import numpy as np
import pytest
import torch

from common.arch import ScheduleArch
from common.errors import UserError
from common.diffusion.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers.training_utils import compute_snr  # noqa: E402

SHAPE = (6, 4, 8, 8)


@pytest.fixture(scope="module")
def ref():
    return diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _sched(param="eps"):
    return NoiseSchedule(ScheduleArch(parameterization=param))


def _batch():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 1, 17, 500, 998, 999], dtype=np.int64)
    return x0, noise, t


def test_tables_match_diffusers(ref):
    s = _sched()
    assert s.num_train_timesteps == 1000 and s.parameterization == "eps"
    assert s.betas.dtype == np.float64 and s.alphas_cumprod.dtype == np.float64
    assert s.betas.shape == s.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(s.betas, ref.betas.double().numpy(), rtol=1e-6)
    # diffusers' float32 cumprod drifts up to ~1e-6 relative from the float64 product.
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-6)
    assert s.betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert s.betas[-1] == pytest.approx(0.012, rel=1e-12)
    # float64 is the exact product; the float32 tables are its rounding.
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas), rtol=1e-14)
    assert s.sqrt_alphas_cumprod.dtype == np.float32
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - s.alphas_cumprod), rtol=1e-7)


def test_coefficients():
    s = _sched()
    t = np.array([3, 400, 999])
    a, b = s.coefficients(t)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (3,)
    np.testing.assert_allclose(a ** 2 + b ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(a, np.sqrt(s.alphas_cumprod[t]), rtol=1e-7)


def test_add_noise_matches_diffusers(ref):
    s = _sched()
    x0, noise, t = _batch()
    ours = s.add_noise(x0, noise, t)
    theirs = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_velocity_matches_diffusers(ref):
    s = _sched("v")
    x0, noise, t = _batch()
    theirs = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(s.velocity(x0, noise, t), theirs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(s.training_target(x0, noise, t), s.velocity(x0, noise, t))


def test_eps_target_is_noise_and_inverts():
    s = _sched("eps")
    x0, noise, t = _batch()
    np.testing.assert_array_equal(s.training_target(x0, noise, t), noise)
    # x0 = (x_t - sqrt(1-ac) eps) / sqrt(ac): add_noise is the forward process it claims to be.
    a, b = s.coefficients(t)
    x_t = s.add_noise(x0, noise, t)
    rec = (x_t - b[:, None, None, None] * noise) / a[:, None, None, None]
    np.testing.assert_allclose(rec, x0, atol=1e-4)


def test_snr_matches_compute_snr(ref):
    s = _sched()
    t = np.arange(0, 1000, 7)
    theirs = compute_snr(ref, torch.from_numpy(t)).numpy()
    # Near t=0, 1 - ac is small and diffusers' float32 table is off by up to ~1e-4 relative there.
    np.testing.assert_allclose(s.snr(t), theirs, rtol=2e-4)
    assert np.all(np.diff(s.snr(t)) < 0)


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_diffusers_recipe(ref, param, gamma):
    s = _sched(param)
    t = torch.from_numpy(np.arange(0, 1000, 3))
    snr = compute_snr(ref, t)
    w = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    w = w / snr if param == "eps" else w / (snr + 1)
    ours = s.min_snr_weights(t.numpy(), gamma)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, w.numpy(), rtol=2e-4)
    # Low-noise (high-SNR) steps are down-weighted; noisy steps keep weight 1 (eps) for snr < gamma.
    assert ours[0] < ours[-1]
    if param == "eps":
        assert ours[-1] == pytest.approx(1.0)


def test_rejects_unknown_schedule_and_parameterization():
    with pytest.raises(UserError, match="beta_schedule"):
        NoiseSchedule(ScheduleArch(beta_schedule="cosine"))
    with pytest.raises(UserError, match="parameterization"):
        NoiseSchedule(ScheduleArch(parameterization="x0"))
    with pytest.raises(ValueError):
        _sched().coefficients(np.array([1000]))
    with pytest.raises(TypeError):
        _sched().snr(np.array([1.5]))
