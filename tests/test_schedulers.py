"""Training sigma tables, t <-> sigma, scalings, schedules, names and sigmas_for."""

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from edgesd import schedulers as S
from edgesd.errors import InvalidArgumentError, UnknownNameError
from edgesd.schedulers.beta_dist import beta_cdf, beta_ppf

TABLE = S.sigma_table()
SMIN, SMAX = TABLE[0], TABLE[-1]
SD = dict(beta_start=0.00085, beta_end=0.012)


# --- tables -----------------------------------------------------------------------------


def test_sd_table_values():
    assert len(TABLE) == 1000 and np.all(np.diff(TABLE) > 0)
    # float64 values; float32 pipelines get 0.0291675 for sigma_min
    assert SMIN == pytest.approx(0.02916716, rel=1e-6) and SMAX == pytest.approx(14.614641, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(beta_schedule="scaled_linear", **SD),
                                dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
                                dict(beta_schedule="squaredcos_cap_v2")])
def test_tables_match_diffusers(kw):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDIMScheduler(**kw).alphas_cumprod.double().numpy()  # accumulated in float32
    np.testing.assert_allclose(S.alphas_cumprod(**kw), theirs, rtol=5e-5)
    # 1 - alpha_bar loses digits in float32 where alpha_bar is near 1 (the smallest sigmas)
    np.testing.assert_allclose(S.sigma_table(**kw), np.sqrt((1 - theirs) / theirs), rtol=3e-4)
    np.testing.assert_allclose(S.sigma_table(**kw)[50:], np.sqrt((1 - theirs) / theirs)[50:], rtol=5e-5)


def test_zero_terminal_snr_table():
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDIMScheduler(**SD, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    theirs = theirs.alphas_cumprod.double().numpy()
    ours = S.alphas_cumprod(**SD, rescale_zero_terminal_snr=True)
    assert theirs[-1] == 0
    np.testing.assert_allclose(ours[:-1], theirs[:-1], rtol=5e-5)
    table = S.sigma_table(**SD, rescale_zero_terminal_snr=True)
    assert np.all(np.isfinite(table)) and table[-1] == pytest.approx(4518.8, rel=1e-4)  # A1111's clamp
    assert table[0] == pytest.approx(SMIN, rel=1e-6)  # the first alpha_bar is kept


def test_unknown_beta_schedule():
    with pytest.raises(UnknownNameError, match="scaled_linear"):
        S.sigma_table("scaled_linaer")


def _kdiff_sigma_to_t(sigma, table):
    """k-diffusion DiscreteSchedule.sigma_to_t, transcribed to numpy."""
    log_sigmas = np.log(table)
    log_sigma = np.log(np.atleast_1d(sigma))
    dists = log_sigma - log_sigmas[:, None]
    low = np.minimum(np.cumsum(dists >= 0, axis=0).argmax(axis=0), len(table) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def test_sigma_to_t_is_k_diffusion():
    sig = np.concatenate([[0.01, SMIN, 0.5, 1.0, 3.3, SMAX, 20.0], np.exp(np.random.default_rng(0).uniform(-4, 3, 50))])
    np.testing.assert_allclose(S.sigma_to_t(sig, TABLE), _kdiff_sigma_to_t(sig, TABLE), rtol=1e-12, atol=1e-9)
    assert S.sigma_to_t(float(TABLE[321]), TABLE) == pytest.approx(321, abs=1e-9)
    assert isinstance(S.sigma_to_t(1.0, TABLE), float)


def test_t_to_sigma():
    assert S.t_to_sigma(321, TABLE) == pytest.approx(TABLE[321], rel=1e-12)
    mid = S.t_to_sigma(np.array([10.25]), TABLE)[0]
    assert mid == pytest.approx(math.exp(0.75 * math.log(TABLE[10]) + 0.25 * math.log(TABLE[11])), rel=1e-12)
    t = np.linspace(0, 999, 777)
    np.testing.assert_allclose(S.sigma_to_t(S.t_to_sigma(t, TABLE), TABLE), t, atol=1e-8)


def test_scalings():
    s = 2.0
    assert S.scalings(s, "epsilon") == (1.0, -2.0, pytest.approx(1 / math.sqrt(5)))
    c_skip, c_out, c_in = S.scalings(s, "v_prediction")
    assert (c_skip, c_out, c_in) == (pytest.approx(0.2), pytest.approx(-2 / math.sqrt(5)), pytest.approx(1 / math.sqrt(5)))
    # consistency: a perfect v-model gives back x0 (v = alpha * eps - sigma_vp * x0)
    x0, eps = 0.7, -1.3
    alpha, sigma_vp = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
    x = x0 + s * eps
    assert x * c_skip + (alpha * eps - sigma_vp * x0) * c_out == pytest.approx(x0)
    assert x * 1 + eps * (-s) == pytest.approx(x0)
    arr = S.scalings(np.array([0.5, 2.0]), "epsilon")
    assert arr[1].shape == (2,)
    with pytest.raises(UnknownNameError):
        S.scalings(1.0, "eps")


# --- schedules --------------------------------------------------------------------------


def test_beta_ppf_known_values():
    q = np.linspace(0, 1, 11)
    np.testing.assert_allclose(beta_ppf(q, 1, 1), q, atol=1e-12)
    np.testing.assert_allclose(beta_ppf(q, 2, 1), np.sqrt(q), atol=1e-12)
    np.testing.assert_allclose(beta_ppf(q, 1, 2), 1 - np.sqrt(1 - q), atol=1e-12)
    np.testing.assert_allclose(beta_ppf(q, 0.5, 0.5), np.sin(np.pi * q / 2) ** 2, atol=1e-12)  # arcsine law
    p = beta_ppf(q, 0.6, 0.6)
    np.testing.assert_allclose(p + p[::-1], 1, atol=1e-12)
    assert p[5] == pytest.approx(0.5, abs=1e-12)
    for v in (1e-6, 0.01, 0.3, 0.77, 0.999):
        assert beta_cdf(beta_ppf(v, 0.6, 0.6), 0.6, 0.6) == pytest.approx(v, rel=1e-10)


def test_beta_ppf_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    q = np.linspace(0, 1, 37)
    for a, b in [(0.6, 0.6), (2.5, 0.7), (0.3, 4.0)]:
        np.testing.assert_allclose(beta_ppf(q, a, b), stats.beta.ppf(q, a, b), atol=1e-10)


def test_karras_exponential_polyexponential():
    n, rho = 9, 7.0
    i = np.arange(n)
    karras = (SMAX ** (1 / rho) + i / (n - 1) * (SMIN ** (1 / rho) - SMAX ** (1 / rho))) ** rho
    np.testing.assert_allclose(S.get_sigmas("Karras", n, TABLE), np.append(karras, 0), rtol=1e-12)
    expo = np.exp(np.log(SMAX) + i / (n - 1) * (np.log(SMIN) - np.log(SMAX)))
    np.testing.assert_allclose(S.get_sigmas("exponential", n, TABLE), np.append(expo, 0), rtol=1e-12)
    np.testing.assert_allclose(S.get_sigmas("Polyexponential", n, TABLE), np.append(expo, 0), rtol=1e-12)
    r = np.linspace(1, 0, n) ** 2
    poly2 = np.exp(r * (np.log(SMAX) - np.log(SMIN)) + np.log(SMIN))
    np.testing.assert_allclose(S.get_sigmas("Polyexponential", n, TABLE, rho=2), np.append(poly2, 0), rtol=1e-12)
    np.testing.assert_allclose(S.get_sigmas("Karras", n, TABLE, rho=3)[1],
                               (SMAX ** (1 / 3) + (SMIN ** (1 / 3) - SMAX ** (1 / 3)) / 8) ** 3, rtol=1e-12)


def test_uniform_is_k_diffusion_default():
    n = 7
    t = np.linspace(999, 0, n)
    lo, w = np.floor(t).astype(int), t - np.floor(t)
    hi = np.ceil(t).astype(int)
    expected = np.exp((1 - w) * np.log(TABLE[lo]) + w * np.log(TABLE[hi]))
    for name in ("Automatic", "Uniform", "Normal"):
        np.testing.assert_allclose(S.get_sigmas(name, n, TABLE), np.append(expected, 0), rtol=1e-12)


def test_sgm_uniform():
    n = 6
    t = np.linspace(999, 0, n + 1)[:-1]
    np.testing.assert_allclose(S.get_sigmas("SGM Uniform", n, TABLE), np.append(S.t_to_sigma(t, TABLE), 0), rtol=1e-12)
    assert S.get_sigmas("sgm_uniform", n, TABLE)[-2] > SMIN


def test_simple_and_ddim_schedules():
    np.testing.assert_array_equal(S.get_sigmas("Simple", 10, TABLE), np.append(TABLE[[999 - 100 * i for i in range(10)]], 0))
    np.testing.assert_array_equal(S.get_sigmas("Simple", 3, TABLE), np.append(TABLE[[999, 666, 333]], 0))
    np.testing.assert_array_equal(S.get_sigmas("DDIM", 10, TABLE), np.append(TABLE[np.arange(901, 0, -100)], 0))
    # A1111 quirk kept: 1000 // 30 = 33 gives 31 timesteps
    assert len(S.get_sigmas("DDIM", 30, TABLE)) == 32


def test_kl_optimal():
    n = 8
    sig = S.get_sigmas("KL Optimal", n, TABLE)
    assert len(sig) == n + 1 and sig[0] == pytest.approx(SMAX) and sig[-1] == pytest.approx(SMIN)
    np.testing.assert_allclose(np.diff(np.arctan(sig)), (math.atan(SMIN) - math.atan(SMAX)) / n, rtol=1e-10)


@pytest.mark.parametrize("model, table", [("sd15", S.schedules.AYS_SIGMAS["sd15"]), ("sdxl", S.schedules.AYS_SIGMAS["sdxl"])])
def test_align_your_steps(model, table):
    sig = S.get_sigmas("Align Your Steps", 11, TABLE, ays_model=model)
    np.testing.assert_allclose(sig[1:-2], table[1:-1], rtol=1e-12)
    # the ends (14.615, 0.029) are clipped into the model's range
    assert sig[0] == SMAX and sig[-2] == SMIN and sig[-1] == 0
    sig21 = S.get_sigmas("align_your_steps", 21, TABLE, ays_model=model)
    np.testing.assert_allclose(sig21[2:-2:2], table[1:-1], rtol=1e-12)  # knots kept
    np.testing.assert_allclose(sig21[1], math.sqrt(min(table[0], SMAX) * table[1]), rtol=1e-3)  # log-linear
    with pytest.raises(UnknownNameError):
        S.get_sigmas("AYS", 10, TABLE, ays_model="sd3")


def test_beta_schedule():
    n = 9
    expected = SMIN + beta_ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (SMAX - SMIN)
    np.testing.assert_allclose(S.get_sigmas("Beta", n, TABLE), np.append(expected, 0), rtol=1e-12)


@pytest.mark.parametrize("name", list(S.SCHEDULES))
@pytest.mark.parametrize("n", [1, 4, 25])
def test_every_schedule_respects_range(name, n):
    sig = S.get_sigmas(name, n, TABLE)
    body = sig[:-1] if sig[-1] == 0 else sig
    assert sig.dtype == np.float64 and np.all(np.diff(sig) <= 0)
    assert np.all(body <= SMAX * (1 + 1e-12)) and np.all(body >= SMIN * (1 - 1e-12))
    if name not in ("KL Optimal", "DDIM", "Simple"):
        assert len(sig) == n + 1


@pytest.mark.parametrize("name", ["Karras", "Exponential", "Polyexponential", "KL Optimal", "Beta", "Normal",
                                  "SGM Uniform", "Align Your Steps"])
def test_schedules_use_given_range(name):
    sig = S.get_sigmas(name, 10, TABLE, sigma_min=0.1, sigma_max=5.0)
    body = sig[:-1] if sig[-1] == 0 else sig
    assert body.max() <= 5.0 * (1 + 1e-9) and body.min() >= 0.1 * (1 - 1e-9)
    if name not in ("SGM Uniform", "Align Your Steps"):
        assert body[0] == pytest.approx(5.0) and body[-1] == pytest.approx(0.1)


def test_bad_schedule_arguments():
    with pytest.raises(InvalidArgumentError):
        S.get_sigmas("Karras", 0, TABLE)
    with pytest.raises(InvalidArgumentError):
        S.get_sigmas("Karras", 5, TABLE, sigma_min=3, sigma_max=2)
    with pytest.raises(InvalidArgumentError):
        S.get_sigmas("Karras", 5, TABLE[::-1])


# --- names ------------------------------------------------------------------------------


A1111_SAMPLERS = ["Euler", "Euler a", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
                  "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "Restart", "DDIM",
                  "PLMS", "UniPC", "LCM"]


def test_listings():
    assert list(S.SAMPLERS) == A1111_SAMPLERS
    assert list(S.SCHEDULES) == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                                 "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
    assert all(isinstance(v, str) and v for v in list(S.SAMPLERS.values()) + list(S.SCHEDULES.values()))


@pytest.mark.parametrize("alias, name", [
    ("euler", "Euler"), ("sample_euler_ancestral", "Euler a"), ("euler_ancestral", "Euler a"), ("k_euler_a", "Euler a"),
    ("EULER A", "Euler a"), ("dpmpp_2m", "DPM++ 2M"), ("dpm++ 2m", "DPM++ 2M"), ("k_dpmpp_2m", "DPM++ 2M"),
    ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"), ("dpmpp_sde", "DPM++ SDE"),
    ("dpmpp_3m_sde", "DPM++ 3M SDE"), ("dpmpp_2s_ancestral", "DPM++ 2S a"), ("dpm_2", "DPM2"),
    ("dpm_2_ancestral", "DPM2 a"), ("k_dpm_2_a", "DPM2 a"), ("lms", "LMS"), ("heun", "Heun"), ("dpm_fast", "DPM fast"),
    ("k_dpm_ad", "DPM adaptive"), ("uni_pc", "UniPC"), ("unipc", "UniPC"), ("lcm", "LCM"), ("ddim", "DDIM"),
    ("plms", "PLMS"), ("restart", "Restart")])
def test_sampler_aliases(alias, name):
    assert S.resolve_sampler(alias) == name


@pytest.mark.parametrize("alias, name", [("karras", "Karras"), ("exponential", "Exponential"),
                                         ("sgm_uniform", "SGM Uniform"), ("SGMUniform", "SGM Uniform"),
                                         ("kl_optimal", "KL Optimal"), ("align_your_steps", "Align Your Steps"),
                                         ("automatic", "Automatic"), (None, "Automatic"), ("BETA", "Beta")])
def test_schedule_aliases(alias, name):
    assert S.resolve_schedule(alias) == name


def test_unknown_names_list_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        S.resolve_sampler("Eulr a")
    msg = str(err.value)
    assert "unknown sampler 'Eulr a'" in msg and "Did you mean 'Euler a'" in msg and "DPM++ 2M SDE Heun" in msg
    with pytest.raises(UnknownNameError, match="Karras"):
        S.get_sigmas("karas", 10, TABLE)
    with pytest.raises(UnknownNameError, match="unknown sampler"):
        S.sigmas_for("nope", "Karras", 10, TABLE)


# --- sigmas_for -------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, schedule", [
    ("Euler", "Uniform"), ("Euler a", "Uniform"), ("LMS", "Uniform"), ("Heun", "Uniform"), ("DPM++ 2M", "Karras"),
    ("DPM++ SDE", "Karras"), ("DPM++ 2S a", "Karras"), ("DPM++ 2M SDE", "Exponential"),
    ("DPM++ 2M SDE Heun", "Exponential"), ("Restart", "Karras"), ("DPM fast", "Uniform")])
def test_automatic_defaults(sampler, schedule):
    np.testing.assert_array_equal(S.sigmas_for(sampler, "Automatic", 12, TABLE), S.get_sigmas(schedule, 12, TABLE))


@pytest.mark.parametrize("sampler, schedule", [("DPM2", "Karras"), ("DPM2 a", "Karras"), ("DPM++ 3M SDE", "Exponential")])
def test_discard_penultimate(sampler, schedule):
    full = S.get_sigmas(schedule, 13, TABLE)
    got = S.sigmas_for(sampler, "Automatic", 12, TABLE)
    np.testing.assert_array_equal(got, np.append(full[:-2], 0.0))
    assert len(got) == 13
    np.testing.assert_array_equal(S.sigmas_for(sampler, "Uniform", 12, TABLE)[:-1],
                                  S.get_sigmas("Uniform", 13, TABLE)[:-2])


def test_timestep_grids():
    ddim = S.sigmas_for("DDIM", "Automatic", 20, TABLE)
    np.testing.assert_array_equal(ddim, np.append(TABLE[np.arange(951, 0, -50)], SMIN))
    np.testing.assert_array_equal(S.sigmas_for("PLMS", "Automatic", 20, TABLE), ddim)
    np.testing.assert_array_equal(S.sigmas_for("DDIM", "Karras", 20, TABLE), S.get_sigmas("Karras", 20, TABLE))
    lcm_t, lcm = S.timestep_grid("lcm", 4, TABLE)
    np.testing.assert_array_equal(lcm_t, [999, 759, 499, 259])
    np.testing.assert_array_equal(S.sigmas_for("LCM", "Automatic", 4, TABLE), np.append(TABLE[lcm_t], 0))
    uni = S.sigmas_for("UniPC", "Automatic", 10, TABLE)
    assert len(uni) == 11 and uni[0] == pytest.approx(SMAX, rel=1e-12) and uni[-1] == pytest.approx(SMIN, rel=1e-12)
    # A1111's UniPC noise schedule: log alpha_bar linear between integer timesteps
    tau = np.linspace(999, 0, 11)
    log_abar = np.log(S.alphas_cumprod(**SD))
    lo, w = np.floor(tau).astype(int), tau - np.floor(tau)
    abar = np.exp((1 - w) * log_abar[lo] + w * log_abar[np.minimum(lo + 1, 999)])
    np.testing.assert_allclose(uni, np.sqrt((1 - abar) / abar), rtol=1e-10)
    with pytest.raises(InvalidArgumentError):
        S.sigmas_for("LCM", "Automatic", 51, TABLE)


def test_latent_scales():
    sig = S.sigmas_for("DDIM", "Automatic", 10, TABLE)
    assert S.latent_scales("ddim", sig) == (pytest.approx(math.sqrt(1 + sig[0] ** 2)), pytest.approx(1 / math.sqrt(1 + SMIN**2)))
    sig = S.sigmas_for("Euler a", "Automatic", 10, TABLE)
    assert S.latent_scales("Euler a", sig) == (sig[0], 1.0)


@pytest.mark.parametrize("label, expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")), ("DPM++ 2M", ("DPM++ 2M", "Automatic")),
    ("DPM++ 2M SDE", ("DPM++ 2M SDE", "Automatic")), ("DPM++ 2M SDE Heun Exponential", ("DPM++ 2M SDE Heun", "Exponential")),
    ("DPM++ 3M SDE Karras", ("DPM++ 3M SDE", "Karras")), ("Euler a", ("Euler a", "Automatic")),
    ("LMS Karras", ("LMS", "Karras")), ("DPM2 a Karras", ("DPM2 a", "Karras")), ("Euler SGM Uniform", ("Euler", "SGM Uniform"))])
def test_split_sampler_label(label, expected):
    assert S.split_sampler_label(label) == expected


def test_split_sampler_label_unknown():
    with pytest.raises(UnknownNameError):
        S.split_sampler_label("Foo Karras")


def test_import_is_pure_numpy():
    import subprocess
    import sys

    code = ("import sys, edgesd.schedulers as s; s.sample('Euler a', lambda x, sg: x * 0, "
            "__import__('numpy').ones((1, 4, 2, 2), 'float32'), s.get_sigmas('Beta', 3, s.sigma_table()), seed=1); "
            "bad = [m for m in ('torch', 'onnxruntime', 'scipy', 'diffusers') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_initial_noise_scale():
    sig = S.sigmas_for("DDIM", "Automatic", 10, TABLE)
    assert S.initial_noise_scale("DDIM", "Automatic", sig) == pytest.approx(math.sqrt(1 + sig[0] ** 2))
    karras = S.sigmas_for("DDIM", "Karras", 10, TABLE)
    assert S.initial_noise_scale("DDIM", "Karras", karras) == karras[0]
    assert S.latent_scales("DDIM", karras, "Karras") == (karras[0], 1.0)
    assert S.initial_noise_scale("Euler", "Automatic", karras) == karras[0]
