"""Samplers against diffusers' schedulers, step by step, on an exact Gaussian denoiser.

Both sides start from the same latent, get the same denoiser and (for stochastic
samplers) the same injected noise; every intermediate latent must agree within 1e-5
relative to the trajectory's scale. diffusers' VP-space schedulers are compared in VP
space (x_vp = x_ve / sqrt(1 + sigma^2)).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edgesd import schedulers as S
from edgesd.schedulers.testing import gaussian_denoiser

RTOL = 1e-5
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
TIMESTEP_SD15 = dict(SD15, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
MEAN = np.array([0.3, -0.5, 0.1, 0.8]).reshape(4, 1, 1)
STD = np.array([0.5, 1.0, 0.7, 0.2]).reshape(4, 1, 1)
SHAPE = (2, 4, 6, 6)
TABLE = S.sigma_table()
DENOISE = gaussian_denoiser(MEAN, STD)


def unit_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def eps_of(x_ve, sigma):
    """The noise prediction of a perfect eps-model for the VE latent x at sigma."""
    x_ve = np.asarray(x_ve, dtype=np.float64)
    return torch.from_numpy(((x_ve - DENOISE(x_ve, sigma).astype(np.float64)) / sigma).astype(np.float32))


def ours(sampler, sigmas, x, vp=False, **kw):
    """Our trajectory: the latent before each step, then the result (VP-scaled if vp)."""
    traj = []
    out = S.sample(sampler, DENOISE, x.copy(), sigmas, callback=lambda i, s, xi, d: traj.append(xi.copy()), **kw)
    traj.append(out)
    assert out.dtype == np.float32
    if vp:
        traj = [t / np.sqrt(1 + float(s) ** 2) for t, s in zip(traj, sigmas)]
    return traj


def assert_close(a_traj, b_traj, rtol=RTOL):
    assert len(a_traj) == len(b_traj), (len(a_traj), len(b_traj))
    scale = max(np.abs(np.asarray(b, dtype=np.float64)).max() for b in b_traj)
    for i, (a, b) in enumerate(zip(a_traj, b_traj)):
        err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / scale
        assert err <= rtol, f"step {i} of {len(b_traj) - 1}: relative error {err:.3g}"


def torch_noise(seed):
    """Both sides draw the same N(0, 1) stream: diffusers through a generator, we by call."""
    gen = torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(seed), lambda: torch.randn(SHAPE, generator=gen).numpy()


def drive(sched, x, sigma_of, vp=False, full_step=lambda s: True, **step_kw):
    """Run a diffusers scheduler with the exact eps-model; record the latent after each
    full step (VE latent for k-style schedulers, VP for the others)."""
    sample = torch.from_numpy(x.copy())
    traj = [sample.double().numpy()]
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(sample, t)
        sigma = float(sigma_of(sched, i))
        x_ve = sample.double().numpy() * ((1 + sigma**2) ** 0.5 if vp else 1.0)
        sample = sched.step(eps_of(x_ve, sigma), t, sample, **step_kw).prev_sample
        if full_step(sched) or i == len(sched.timesteps) - 1:
            traj.append(sample.double().numpy())
    return traj


def k_sigma(sched, i):
    return sched.sigmas[sched.step_index]


def nth_sigma(sched, i):
    return sched.sigmas[i]


def unique_sigmas(sched):
    """The k-diffusion sigma list behind a scheduler's (possibly interleaved) sigmas."""
    s = sched.sigmas.double().numpy()
    keep = np.append(True, s[1:] != s[:-1])
    return s[keep]


# --- k-diffusion style schedulers (VE sample) ------------------------------------------


@pytest.mark.parametrize("schedule", ["Automatic", "Karras"])
def test_euler(schedule):
    sigmas = S.sigmas_for("Euler", schedule, 12, TABLE)
    x = unit_noise() * np.float32(sigmas[0])
    sched = diffusers.EulerDiscreteScheduler(**SD15)
    sched.set_timesteps(sigmas=list(sigmas))
    assert_close(ours("Euler", sigmas, x), drive(sched, x, k_sigma))


def test_euler_ancestral():
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD15)
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double().numpy()
    x = unit_noise() * np.float32(sigmas[0])
    gen, noise = torch_noise(5)
    assert_close(ours("Euler a", sigmas, x, noise=noise), drive(sched, x, k_sigma, generator=gen))


def test_heun():
    sched = diffusers.HeunDiscreteScheduler(**SD15, use_karras_sigmas=True)
    sched.set_timesteps(8)
    sigmas = unique_sigmas(sched)
    x = unit_noise() * np.float32(sigmas[0])
    assert_close(ours("Heun", sigmas, x), drive(sched, x, k_sigma, full_step=lambda s: s.state_in_first_order))


def test_dpm2():
    sched = diffusers.KDPM2DiscreteScheduler(**SD15)
    sched.set_timesteps(8)
    sigmas = unique_sigmas(sched)
    x = unit_noise() * np.float32(sigmas[0])
    sigma_of = lambda s, i: s.sigmas[s.step_index] if s.state_in_first_order else s.sigmas_interpol[s.step_index]
    assert_close(ours("DPM2", sigmas, x), drive(sched, x, sigma_of, full_step=lambda s: s.state_in_first_order))


def test_dpm2_ancestral():
    sched = diffusers.KDPM2AncestralDiscreteScheduler(**SD15)
    sched.set_timesteps(8)
    sigmas = unique_sigmas(sched)
    x = unit_noise() * np.float32(sigmas[0])
    gen, noise = torch_noise(7)
    sigma_of = lambda s, i: s.sigmas[s.step_index] if s.state_in_first_order else s.sigmas_interpol[s.step_index - 1]
    assert_close(ours("DPM2 a", sigmas, x, noise=noise),
                 drive(sched, x, sigma_of, full_step=lambda s: s.state_in_first_order, generator=gen))


def _gauss_legendre_quad(fn, a, b, epsrel=None):
    """Stand-in for scipy.integrate.quad on the LMS polynomials (exact for degree < 20)."""
    nodes, weights = np.polynomial.legendre.leggauss(10)
    mid, half = (a + b) / 2, (b - a) / 2
    return float(sum(w * fn(mid + half * t) for t, w in zip(nodes, weights)) * half), 0.0


@pytest.mark.parametrize("schedule", ["Automatic", "Karras"])
def test_lms(monkeypatch, schedule):
    from diffusers.schedulers import scheduling_lms_discrete as lms_mod  # the real class even without scipy

    if not hasattr(lms_mod, "integrate"):
        monkeypatch.setattr(lms_mod, "integrate", type("quad", (), {"quad": staticmethod(_gauss_legendre_quad)}),
                            raising=False)
    sched = lms_mod.LMSDiscreteScheduler(**SD15, use_karras_sigmas=schedule == "Karras")
    sched.set_timesteps(10)
    sigmas = sched.sigmas.double().numpy()
    x = unit_noise() * np.float32(sigmas[0])
    assert_close(ours("LMS", sigmas, x), drive(sched, x, k_sigma))


# --- VP-space schedulers --------------------------------------------------------------


def dpm_multistep(**kw):
    return diffusers.DPMSolverMultistepScheduler(**SD15, use_karras_sigmas=True, solver_order=2, **kw)


def test_dpmpp_2m_karras():
    sched = dpm_multistep(algorithm_type="dpmsolver++")
    sched.set_timesteps(10)
    sigmas = sched.sigmas.double().numpy()
    # diffusers accumulates alpha_bar in float32: its sigma_min is 1.3e-5 relative off
    np.testing.assert_allclose(sigmas, S.get_sigmas("Karras", 10, TABLE), rtol=5e-5)
    x = unit_noise()
    assert_close(ours("DPM++ 2M", sigmas, x * np.float32((1 + sigmas[0] ** 2) ** 0.5), vp=True),
                 drive(sched, x, nth_sigma, vp=True))


@pytest.mark.parametrize("sampler, solver_type", [("DPM++ 2M SDE", "midpoint"), ("DPM++ 2M SDE Heun", "heun")])
def test_dpmpp_2m_sde(sampler, solver_type):
    sched = dpm_multistep(algorithm_type="sde-dpmsolver++", solver_type=solver_type)
    sched.set_timesteps(10)
    sigmas = sched.sigmas.double().numpy()
    x = unit_noise()
    gen, noise = torch_noise(11)
    theirs = drive(sched, x, nth_sigma, vp=True, generator=gen)
    ours_traj = ours(sampler, sigmas, x * np.float32((1 + sigmas[0] ** 2) ** 0.5), vp=True,
                     noise=lambda sigma, sigma_next: noise())
    assert_close(ours_traj, theirs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(eta):
    n = 12
    sched = diffusers.DDIMScheduler(**TIMESTEP_SD15, clip_sample=False)
    sched.set_timesteps(n)
    sigmas = S.sigmas_for("DDIM", "Automatic", n, TABLE)
    np.testing.assert_allclose(sigmas[:-1], [vp_sigma_at(sched, t) for t in sched.timesteps], rtol=1e-5)
    assert sigmas[-1] == TABLE[0]
    zs = [unit_noise(100 + k) for k in range(n)]
    x = unit_noise()
    theirs = [x.astype(np.float64)]
    sample = torch.from_numpy(x.copy())
    for k, t in enumerate(sched.timesteps):
        sigma = vp_sigma_at(sched, t)
        eps = eps_of(sample.double().numpy() * (1 + sigma**2) ** 0.5, sigma)
        sample = sched.step(eps, t, sample, eta=eta, variance_noise=torch.from_numpy(zs[k])).prev_sample
        theirs.append(sample.double().numpy())
    it = iter(zs)
    init, _ = S.latent_scales("DDIM", sigmas)
    assert_close(ours("DDIM", sigmas, x * np.float32(init), vp=True, eta=eta, noise=lambda: next(it)), theirs)


def vp_sigma_at(sched, t):
    a = float(sched.alphas_cumprod[int(t)])
    return ((1 - a) / a) ** 0.5


def test_plms():
    n = 10
    sched = diffusers.PNDMScheduler(**TIMESTEP_SD15, skip_prk_steps=True)
    sched.set_timesteps(n)
    sigmas = S.sigmas_for("PLMS", "Automatic", n, TABLE)
    x = unit_noise()
    sample = torch.from_numpy(x.copy())
    theirs = [x.astype(np.float64)]
    for k, t in enumerate(sched.timesteps):
        sigma = vp_sigma_at(sched, t)
        eps = eps_of(sample.double().numpy() * (1 + sigma**2) ** 0.5, sigma)
        sample = sched.step(eps, t, sample).prev_sample
        if k != 0:  # diffusers' first call only predicts; the second completes step 1 (improved Euler)
            theirs.append(sample.double().numpy())
    init, _ = S.latent_scales("PLMS", sigmas)
    assert_close(ours("PLMS", sigmas, x * np.float32(init), vp=True), theirs)


@pytest.mark.parametrize("order, variant, final", [(2, "bh2", "zero"), (3, "bh2", "zero"), (3, "bh1", "sigma_min"),
                                                   (2, "bh1", "sigma_min")])
def test_unipc(order, variant, final):
    # diffusers' bh1 update gives nan on a last step to sigma = 0 (B(h) = -inf times 0)
    sched = diffusers.UniPCMultistepScheduler(**SD15, solver_order=order, solver_type=variant, final_sigmas_type=final)
    sched.set_timesteps(10)
    sigmas = sched.sigmas.double().numpy()
    x = unit_noise()
    assert_close(ours("UniPC", sigmas, x * np.float32((1 + sigmas[0] ** 2) ** 0.5), vp=True, order=order,
                      variant=variant), drive(sched, x, nth_sigma, vp=True))


def test_lcm():
    n = 4
    sched = diffusers.LCMScheduler(**SD15, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(n)
    sigmas = S.sigmas_for("LCM", "Automatic", n, TABLE)
    np.testing.assert_allclose(sigmas[:-1], [vp_sigma_at(sched, t) for t in sched.timesteps], rtol=1e-5)
    x = unit_noise()
    gen, noise = torch_noise(13)
    sample = torch.from_numpy(x.copy())
    theirs = [x.astype(np.float64)]
    for t in sched.timesteps:
        sigma = vp_sigma_at(sched, t)
        eps = eps_of(sample.double().numpy() * (1 + sigma**2) ** 0.5, sigma)
        sample = sched.step(eps, t, sample, generator=gen).prev_sample
        theirs.append(sample.double().numpy())
    init = np.float32((1 + sigmas[0] ** 2) ** 0.5)
    assert_close(ours("LCM", sigmas, x * init, vp=True, noise=noise, sigma_table=TABLE), theirs)


def test_dpmpp_3m_sde_without_noise_is_dpm_solver_pp_3m():
    # With eta = 0 the 3M SDE update is DPM-Solver++(3M); 16 steps keep diffusers from
    # lowering the order of the second-to-last step; its warm-up second-order step is
    # diffusers' 'heun' form.
    sched = dpm_multistep(algorithm_type="dpmsolver++", solver_type="heun")
    sched.register_to_config(solver_order=3)
    sched = diffusers.DPMSolverMultistepScheduler.from_config(sched.config)
    sched.set_timesteps(16)
    sigmas = sched.sigmas.double().numpy()
    x = unit_noise()
    assert_close(ours("DPM++ 3M SDE", sigmas, x * np.float32((1 + sigmas[0] ** 2) ** 0.5), vp=True, eta=0.0),
                 drive(sched, x, nth_sigma, vp=True))
