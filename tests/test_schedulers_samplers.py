"""Sampler behaviour without a diffusers counterpart: k-diffusion's formulas for the
samplers diffusers lacks, exact-ODE accuracy, convergence to the data distribution, seeds,
the Brownian tree, options and errors. All on an exact Gaussian denoiser, small arrays."""

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from edgesd import schedulers as S
from edgesd.errors import InvalidArgumentError, UnknownNameError
from edgesd.schedulers.testing import gaussian_denoiser

TABLE = S.sigma_table()
MEAN = np.array([0.3, -0.5, 0.1, 0.8]).reshape(4, 1, 1)
STD = np.array([0.5, 1.0, 0.7, 0.2]).reshape(4, 1, 1)
DENOISE = gaussian_denoiser(MEAN, STD)
STOCHASTIC = ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE",
              "Restart", "LCM"]
DETERMINISTIC = [s for s in S.SAMPLERS if s not in STOCHASTIC]


def start(shape, sigma0, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(sigma0)


def noise_stream(shape, seed):
    rng = np.random.default_rng(seed)
    return lambda *args: rng.standard_normal(shape).astype(np.float32)


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# --- k-diffusion's formulas, transcribed literally (t = -log sigma, expm1 forms) -------------

t_fn, sigma_fn = (lambda s: -math.log(s)), (lambda t: math.exp(-t))


def ancestral(s_from, s_to, eta):
    if not eta:
        return s_to, 0.0
    up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
    return (s_to**2 - up**2) ** 0.5, up


def ref_euler_churn(x, sigmas, noise, s_churn, s_tmin, s_tmax):
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = noise()
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        d = (x - DENOISE(x, sigma_hat)) / sigma_hat
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def ref_dpmpp_2s_a(x, sigmas, noise, eta):
    for i in range(len(sigmas) - 1):
        denoised = DENOISE(x, sigmas[i])
        sd, su = ancestral(sigmas[i], sigmas[i + 1], eta)
        if sd == 0:
            x = x + (x - denoised) / sigmas[i] * (sd - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sd)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - math.expm1(-h * 0.5) * denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * DENOISE(x_2, sigma_fn(s))
        if sigmas[i + 1] > 0:
            x = x + noise() * su
    return x


def ref_dpmpp_sde(x, sigmas, noise, eta, r):
    for i in range(len(sigmas) - 1):
        denoised = DENOISE(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (0 - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = ancestral(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - math.expm1(t - s_) * denoised
        x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * su
        denoised_2 = DENOISE(x_2, sigma_fn(s))
        sd, su = ancestral(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * denoised_d
        x = x + noise(sigma_fn(t), sigma_fn(t_next)) * su
    return x


def ref_dpmpp_2m_sde(x, sigmas, noise, eta, solver_type):
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = DENOISE(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + -math.expm1(-h - eta_h) * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (denoised - old)
            if eta:
                x = x + noise() * sigmas[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5
        old, h_last = denoised, h
    return x


def ref_dpmpp_3m_sde(x, sigmas, noise, eta):
    d1_, d2_, h1, h2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        denoised = DENOISE(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = -math.log(sigmas[i + 1]) + math.log(sigmas[i])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + -math.expm1(-h_eta) * denoised
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d1_0, d1_1 = (denoised - d1_) / r0, (d1_ - d2_) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h1 is not None:
                x = x + (math.expm1(-h_eta) / h_eta + 1) * (denoised - d1_) / (h1 / h)
            if eta:
                x = x + noise() * sigmas[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5
        d1_, d2_, h1, h2 = denoised, d1_, h, h1
    return x


def ref_restart(x, sigmas, noise):
    """A1111's restart sampler for 20 <= steps < 36: 9 restart steps, one restart 0.1 -> 2."""
    karras = lambda n, lo, hi: np.append((hi ** (1 / 7) + np.linspace(0, 1, n) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, 0)
    steps = len(sigmas) - 1
    sigmas = karras(steps - 9, sigmas[-2], sigmas[0])
    lo_idx, hi_idx = int(np.argmin(abs(sigmas - 0.1))), int(np.argmin(abs(sigmas - 2)))
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 == lo_idx:
            up = karras(10, sigmas[lo_idx], sigmas[hi_idx])[:-1]
            pairs.extend(zip(up[:-1], up[1:]))
    last = None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + noise() * (old**2 - last**2) ** 0.5
        d = (x - DENOISE(x, old)) / old
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            x = x + (d + (x_2 - DENOISE(x_2, new)) / new) / 2 * (new - old)
        last = new
    return x


SHAPE = (2, 4, 5, 5)


def _compare(sampler, ref, sigmas, *, two_arg_noise=False, **opts):
    x = start(SHAPE, sigmas[0])
    ours_noise, ref_noise = noise_stream(SHAPE, 9), noise_stream(SHAPE, 9)
    got = S.sample(sampler, DENOISE, x.copy(), sigmas, noise=ours_noise if two_arg_noise else (lambda: ours_noise()), **opts)
    want = ref(x.astype(np.float64), [float(s) for s in sigmas], ref_noise)
    assert got.dtype == np.float32
    assert rel_err(got, want) < 1e-5


def test_euler_churn_formula():
    sigmas = S.get_sigmas("Karras", 12, TABLE)
    kw = dict(s_churn=2.0, s_tmin=0.1, s_tmax=5.0)
    _compare("Euler", lambda x, s, n: ref_euler_churn(x, s, n, **kw), sigmas, **kw)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpmpp_2s_ancestral_formula(eta):
    _compare("DPM++ 2S a", lambda x, s, n: ref_dpmpp_2s_a(x, s, n, eta), S.get_sigmas("Karras", 10, TABLE), eta=eta)


@pytest.mark.parametrize("eta, r", [(1.0, 0.5), (0.7, 0.3)])
def test_dpmpp_sde_formula(eta, r):
    _compare("DPM++ SDE", lambda x, s, n: ref_dpmpp_sde(x, s, n, eta, r), S.get_sigmas("Karras", 10, TABLE),
             two_arg_noise=True, eta=eta, r=r)


@pytest.mark.parametrize("sampler, solver_type", [("DPM++ 2M SDE", "midpoint"), ("DPM++ 2M SDE Heun", "heun")])
def test_dpmpp_2m_sde_formula(sampler, solver_type):
    sigmas = S.get_sigmas("Exponential", 10, TABLE)
    _compare(sampler, lambda x, s, n: ref_dpmpp_2m_sde(x, s, n, 0.6, solver_type), sigmas, eta=0.6)


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_dpmpp_3m_sde_formula(eta):
    _compare("DPM++ 3M SDE", lambda x, s, n: ref_dpmpp_3m_sde(x, s, n, eta), S.sigmas_for("DPM++ 3M SDE", "Automatic", 10, TABLE),
             eta=eta)


def test_restart_formula():
    _compare("Restart", ref_restart, S.sigmas_for("Restart", "Automatic", 24, TABLE))


def test_restart_short_runs_are_heun():
    sigmas = S.get_sigmas("Karras", 8, TABLE)
    x = start(SHAPE, sigmas[0])
    np.testing.assert_array_equal(S.sample("Restart", DENOISE, x, sigmas, seed=1), S.sample("Heun", DENOISE, x, sigmas))


def test_dpm_fast_hand_steps():
    smax, smin = float(TABLE[-1]), float(TABLE[0])
    x = start(SHAPE, smax)
    x64 = x.astype(np.float64)
    eps = (x64 - DENOISE(x64, smax)) / smax
    # 1 model call: one first-order step from sigma_max to sigma_min (an Euler step)
    got = S.sample("DPM fast", DENOISE, x, np.array([smax, smin]))
    assert rel_err(got, x64 + (smin - smax) * eps) < 1e-5
    # 2 calls: one DPM-Solver-2 step over the whole range, midpoint in log sigma
    h, s1 = math.log(smax / smin), math.sqrt(smax * smin)
    u1 = x64 - s1 * math.expm1(h / 2) * eps
    eps_r1 = (u1 - DENOISE(u1, s1)) / s1
    want = x64 - smin * math.expm1(h) * eps - smin * math.expm1(h) * (eps_r1 - eps)
    got = S.sample("DPM fast", DENOISE, x, np.array([smax, smin, 0.0]))
    assert rel_err(got, want) < 1e-5


# --- accuracy on the probability-flow ODE, whose solution is known for Gaussian data -------


def exact_ode(x, sigma_from, sigma_to):
    """x0 ~ N(m, s^2): dx/dsigma = (x - D(x)) / sigma keeps (x - m) / sqrt(s^2 + sigma^2) fixed."""
    return MEAN + (x - MEAN) * np.sqrt((STD**2 + sigma_to**2) / (STD**2 + sigma_from**2))


# sampler -> (order of accuracy, options making it an ODE solver)
ODE_ORDERS = {"Euler": 1, "DDIM": 1, "Heun": 2, "DPM2": 2, "DPM++ 2M": 2, "PLMS": 2, "LMS": 3, "UniPC": 3,
              "DPM fast": 2, "DPM++ 2S a": 2, "DPM++ SDE": 2, "DPM++ 2M SDE": 2, "DPM++ 2M SDE Heun": 2,
              "DPM++ 3M SDE": 2, "Euler a": 1, "DPM2 a": 2}


@pytest.mark.parametrize("sampler", list(ODE_ORDERS))
def test_ode_accuracy_and_order(sampler):
    opts = {"eta": 0.0} if sampler in STOCHASTIC else {}
    x0 = np.random.default_rng(0).standard_normal((1, 4, 4, 4))
    errs = []
    for n in (16, 32):
        sigmas = S.get_sigmas("Karras", n, TABLE)[:-1]  # stop at sigma_min, where the ODE is smooth
        x = x0 * sigmas[0]
        want = exact_ode(x, sigmas[0], sigmas[-1])
        errs.append(rel_err(S.sample(sampler, DENOISE, x, sigmas, **opts), want))
    order = ODE_ORDERS[sampler]
    assert errs[1] < 0.05 * 2.0 ** (1 - order)
    assert math.log2(errs[0] / errs[1]) > order - 0.4, errs


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_meets_tolerance(order):
    sigmas = S.get_sigmas("Karras", 10, TABLE)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)) * sigmas[0]
    calls = []
    out = S.sample("DPM adaptive", DENOISE, x, sigmas, order=order, rtol=1e-5, atol=1e-6,
                   callback=lambda i, s, xi, d: calls.append(s))
    assert rel_err(out, exact_ode(x, sigmas[0], sigmas[-2])) < 2e-4
    assert calls[0] == pytest.approx(sigmas[0]) and len(calls) > 10  # its own step count


# --- samples from the data distribution -----------------------------------------------------

# std tolerance (relative) at 50 steps with the sampler's default schedule; first-order
# samplers underestimate the spread of the narrow (std 0.2) channel at this step count.
STD_TOL = {"Euler": 0.2, "Euler a": 0.3, "DDIM": 0.15, "UniPC": 0.12, "DPM adaptive": 0.06}


@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
def test_converges_to_data_distribution(sampler):
    steps = 8 if sampler == "LCM" else 50
    sigmas = S.sigmas_for(sampler, "Automatic", steps, TABLE)
    init, out_scale = S.latent_scales(sampler, sigmas)
    x = start((4, 4, 32, 32), init)
    out = S.sample(sampler, DENOISE, x, sigmas, seed=[1, 2, 3, 4]) * out_scale
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    mean, std = out.mean(axis=(0, 2, 3)), out.std(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, MEAN.ravel(), atol=0.07)  # ~4 standard errors at 4096 samples
    if sampler == "LCM":
        # consistency sampling with an MMSE denoiser shrinks the spread by design
        assert np.all(std < STD.ravel())
    else:
        np.testing.assert_allclose(std, STD.ravel(), rtol=STD_TOL.get(sampler, 0.05))


# --- seeds and noise ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_seed_reproducible_and_per_image(sampler):
    sigmas = S.sigmas_for(sampler, "Automatic", 24 if sampler == "Restart" else 6, TABLE)
    x = start((3, 4, 4, 4), sigmas[0])
    a = S.sample(sampler, DENOISE, x, sigmas, seed=[5, 6, 7])
    np.testing.assert_array_equal(a, S.sample(sampler, DENOISE, x, sigmas, seed=[5, 6, 7]))
    np.testing.assert_array_equal(a, S.sample(sampler, DENOISE, x, sigmas, seed=5))  # int -> 5, 6, 7
    # image 1 is the same alone as in the batch
    np.testing.assert_array_equal(a[1:2], S.sample(sampler, DENOISE, x[1:2], sigmas, seed=[6]))
    assert not np.array_equal(a, S.sample(sampler, DENOISE, x, sigmas, seed=[8, 6, 7]))
    unseeded = S.sample(sampler, DENOISE, x, sigmas)
    assert not np.array_equal(unseeded, S.sample(sampler, DENOISE, x, sigmas))


def test_seed_count_must_match_batch():
    sigmas = S.get_sigmas("Karras", 4, TABLE)
    with pytest.raises(InvalidArgumentError, match="2 seeds"):
        S.sample("Euler a", DENOISE, start((3, 4, 2, 2), sigmas[0]), sigmas, seed=[1, 2])


def test_step_noise_differs_from_initial_noise():
    x = np.zeros((1, 4, 8, 8), np.float32)
    step = S.gaussian_noise(x, seed=42)(1.0, 0.5)
    init = np.random.default_rng(42).standard_normal(x.shape, dtype=np.float32)
    assert abs(np.corrcoef(step.ravel(), init.ravel())[0, 1]) < 0.2


def test_step_noise_is_standard_normal_and_independent():
    from scipy import stats

    draw = S.gaussian_noise(np.zeros((2, 4, 64, 64), np.float32), seed=[5, 6])
    first, second = draw(1.0, 0.5), draw(0.5, 0.2)
    assert first.dtype == np.float32 and first.shape == (2, 4, 64, 64)
    for z in (first[0], first[1], second[0]):  # Box-Muller output: exactly N(0, 1) up to float32
        assert stats.kstest(z.ravel().astype(np.float64), "norm").pvalue > 1e-3
        assert abs(stats.kurtosis(z.ravel())) < 0.1
    pairs = [(first[0], first[1]), (first[0], second[0]), (first[0][0], first[0][1])]
    assert max(abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in pairs) < 0.03


def test_step_noise_does_not_depend_on_threads(monkeypatch):
    from edgesd.schedulers import normal

    x = np.zeros((3, 4, 16, 16), np.float32)
    draw = S.gaussian_noise(x, seed=[1, 2, 3])
    threaded = [draw(), draw()]
    monkeypatch.setattr(normal, "_THREADS", 1)
    draw = S.gaussian_noise(x, seed=[1, 2, 3])
    for expected in threaded:
        np.testing.assert_array_equal(draw(), expected)


def test_noise_callable_forms():
    sigmas = S.get_sigmas("Karras", 5, TABLE)
    x = start((1, 4, 3, 3), sigmas[0])
    z = np.ones(x.shape, np.float32)
    calls = []
    zero_arg = S.sample("Euler a", DENOISE, x, sigmas, noise=lambda: z)
    two_arg = S.sample("Euler a", DENOISE, x, sigmas, noise=lambda s, sn: calls.append((s, sn)) or z)
    np.testing.assert_array_equal(zero_arg, two_arg)
    assert calls == [(pytest.approx(a), pytest.approx(b)) for a, b in zip(sigmas[:-2], sigmas[1:-1])]


def test_brownian_tree_is_consistent_and_brownian():
    shape = (20000,)
    tree = S.BrownianTree(shape, 0.03, 14.6, seed=3)
    pts = [0.5, 1.0, 2.0, 0.07]
    first = [tree(t) for t in pts]
    fresh = S.BrownianTree(shape, 0.03, 14.6, seed=3)
    for t, w in reversed(list(zip(pts, first))):  # other order, fresh cache: same values
        np.testing.assert_array_equal(fresh(t), w)
    assert not np.array_equal(S.BrownianTree(shape, 0.03, 14.6, seed=4)(1.0), first[1])
    # increments: variance = length, independent over disjoint intervals
    grid = [0.03, 0.07, 0.3, 0.5, 1.0, 2.0, 7.0, 14.6]
    incs = [tree(b) - tree(a) for a, b in zip(grid[:-1], grid[1:])]
    for (a, b), inc in zip(zip(grid[:-1], grid[1:]), incs):
        assert inc.var() / (b - a) == pytest.approx(1, abs=0.05)
        assert abs(inc.mean()) < 4 * math.sqrt((b - a) / shape[0])
    corr = np.corrcoef(np.stack(incs))
    assert np.abs(corr - np.eye(len(incs))).max() < 0.05
    assert tree(0.03).std() == 0 and tree(14.6).var() / (14.6 - 0.03) == pytest.approx(1, abs=0.05)


def test_brownian_tree_points_closer_than_its_resolution_form_one_path():
    """Queries inside one leaf of the tree (3 % apart at most) are bridged between each
    other, in any order: their increments still have variance = length and are independent
    (bridged from the leaf's ends each, neighbours would get far too much noise)."""
    shape = (40000,)
    tree = S.BrownianTree(shape, 0.03, 14.6, seed=5, tol=0.03)
    order = [1.0, 1.008, 1.002, 1.006, 1.004]
    values = {t: tree(t) for t in order}
    grid = sorted(values)
    incs = [values[b] - values[a] for a, b in zip(grid[:-1], grid[1:])]
    for (a, b), inc in zip(zip(grid[:-1], grid[1:]), incs):
        assert inc.var() / (b - a) == pytest.approx(1, abs=0.05), (a, b)
    corr = np.corrcoef(np.stack(incs))
    assert np.abs(corr - np.eye(len(incs))).max() < 0.05
    np.testing.assert_array_equal(tree(1.004), values[1.004])  # asked again: the same


def test_brownian_tree_reuses_evicted_arrays_only_when_nobody_holds_them(monkeypatch):
    """Evicted arrays are recycled for new draws (fresh memory's page faults cost more than a
    draw), never one a caller still holds, and the values are those of a tree that recycles none."""
    from edgesd.schedulers import noise

    class CountingNumpy:  # numpy, counting the node arrays allocated afresh
        empties = 0

        def __getattr__(self, name):
            return getattr(np, name)

        def empty(self, *args, **kwargs):
            CountingNumpy.empties += 1
            return np.empty(*args, **kwargs)

    monkeypatch.setattr(noise, "np", CountingNumpy())
    tree = S.BrownianTree((4, 8, 8), 0.03, 14.6, seed=9)
    draws = []
    normal = tree._normal
    monkeypatch.setattr(tree, "_normal", lambda kind, index: draws.append(kind) or normal(kind, index))
    held = tree(7.0)
    kept = held.copy()
    queries = np.geomspace(14.0, 0.031, 400)
    first = [tree(t).copy() for t in queries]
    assert CountingNumpy.empties < len(draws) / 2  # most draws went into recycled arrays
    np.testing.assert_array_equal(held, kept)  # but not into the one the caller holds
    monkeypatch.undo()
    unrecycled = S.BrownianTree((4, 8, 8), 0.03, 14.6, seed=9)
    unrecycled._retire = lambda w: None
    unrecycled(7.0)
    for t, w in zip(queries, first):  # the same queries in the same order: the same values
        np.testing.assert_array_equal(unrecycled(t), w)


def test_brownian_noise_does_not_depend_on_step_count():
    x = np.zeros((2, 3, 8, 8), np.float32)
    coarse = S.brownian_noise(x, 0.03, 14.6, seed=[1, 2])
    fine = S.brownian_noise(x, 0.03, 14.6, seed=[1, 2])
    sig = S.get_sigmas("Exponential", 9, TABLE)[:-1]
    # the noise over [s2, s0] equals the combination of the noises over [s2, s1] and [s1, s0]
    s0, s1, s2 = sig[2], sig[4], sig[6]
    n_big = coarse(s0, s2) * math.sqrt(s0 - s2)
    n_parts = fine(s0, s1) * math.sqrt(s0 - s1) + fine(s1, s2) * math.sqrt(s1 - s2)
    np.testing.assert_allclose(n_big, n_parts, atol=1e-5)
    z = coarse(s0, s2)
    assert z.dtype == np.float32 and abs(z.std() - 1) < 0.15
    # an SDE sampler's result is seeded by the tree: same seed, same image, other step count close
    a = S.sample("DPM++ 2M SDE", DENOISE, start((2, 4, 16, 16), TABLE[-1]), S.get_sigmas("Exponential", 40, TABLE),
                 seed=[3, 4])
    b = S.sample("DPM++ 2M SDE", DENOISE, start((2, 4, 16, 16), TABLE[-1]), S.get_sigmas("Exponential", 80, TABLE),
                 seed=[3, 4])
    c = S.sample("DPM++ 2M SDE", DENOISE, start((2, 4, 16, 16), TABLE[-1]), S.get_sigmas("Exponential", 80, TABLE),
                 seed=[5, 6])
    assert np.abs(a - b).mean() < 0.5 * np.abs(a - c).mean()


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_brownian_lookahead_changes_nothing(sampler):
    """noise_ahead walks the trees to the next level on a background thread: same images."""
    sigmas = S.sigmas_for(sampler, "Automatic", 8, TABLE)
    x = start((2, 4, 8, 8), sigmas[0])
    expected = S.sample(sampler, DENOISE, x, sigmas, seed=[3, 4])
    np.testing.assert_array_equal(S.sample(sampler, DENOISE, x, sigmas, seed=[3, 4], noise_ahead=True), expected)


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_brownian_lookahead_walks_every_level_ahead(sampler, monkeypatch):
    """With the host idle during each model call, the trees are walked ahead to every level
    the sampler asks for (DPM++ SDE's substep points too): the caller's thread draws tree
    nodes only in the first step, whatever the step count."""
    import threading

    from edgesd.schedulers import normal

    draws = []
    original = S.BrownianTree._normal

    def recording(self, kind, index):
        draws.append(threading.current_thread() is threading.main_thread())
        return original(self, kind, index)

    monkeypatch.setattr(S.BrownianTree, "_normal", recording)

    def idle_denoise(x, sigma):
        normal.host_idle()  # as the pipeline does before a GPU UNet call
        return DENOISE(x, sigma)

    inline = []
    for steps in (6, 12):
        sigmas = S.sigmas_for(sampler, "Automatic", steps, TABLE)
        draws.clear()
        S.sample(sampler, idle_denoise, start((2, 4, 8, 8), sigmas[0]), sigmas, seed=[3, 4], noise_ahead=True)
        inline.append(sum(draws))
        assert len(draws) > inline[-1] > 0  # the first step's walk is inline, later ones ahead
    assert inline[0] == inline[1]


def test_work_queued_ahead_waits_for_the_host_to_go_idle():
    """normal.ahead runs its work on the worker thread only after host_idle(); asked for
    before that, it is computed inline, and either way exactly once."""
    import threading

    from edgesd.schedulers import normal

    calls = []

    def work(tag):
        calls.append((tag, threading.current_thread().name))
        return tag

    inline = normal.ahead(lambda: work("inline"))
    assert calls == []  # nothing starts on its own
    assert inline.result() == "inline" and calls == [("inline", threading.current_thread().name)]
    assert normal._queued == []
    queued = [normal.ahead(lambda i=i: work(i)) for i in range(3)]
    normal.host_idle()
    assert normal._queued == []
    assert [h.result() for h in queued] == [0, 1, 2]
    assert [name.startswith("edgesd-ahead") for _, name in calls[1:]] == [True] * 3
    assert len(calls) == 4
    normal.host_idle()  # nothing queued: nothing to do


# --- options, errors, callback ----------------------------------------------------------------


def test_unknown_option_lists_valid_ones():
    sigmas = S.get_sigmas("Karras", 4, TABLE)
    with pytest.raises(InvalidArgumentError, match="'etaa'.*valid: eta, s_noise"):
        S.sample("Euler a", DENOISE, start((1, 4, 2, 2), sigmas[0]), sigmas, etaa=0.5)
    with pytest.raises(InvalidArgumentError, match="valid: none"):
        S.sample("DPM++ 2M", DENOISE, start((1, 4, 2, 2), sigmas[0]), sigmas, eta=0.5)
    with pytest.raises(UnknownNameError, match=r"Did you mean 'DPM\+\+ 2M'"):
        S.sample("DPM++ 2N", DENOISE, start((1, 4, 2, 2), sigmas[0]), sigmas)
    with pytest.raises(InvalidArgumentError):
        S.sample("Euler", DENOISE, start((1, 4, 2, 2), 1.0), [1.0])


def test_callback_and_denoise_arguments():
    sigmas = S.get_sigmas("Karras", 5, TABLE)
    seen, calls = [], []

    def denoise(x, sigma):
        assert type(sigma) is float and x.dtype == np.float32
        calls.append(sigma)
        return DENOISE(x, sigma)

    S.sample("Heun", denoise, start((1, 4, 2, 2), sigmas[0]), sigmas, callback=lambda i, s, x, d: seen.append((i, s)))
    assert [i for i, _ in seen] == list(range(5)) and [s for _, s in seen] == pytest.approx(list(sigmas[:-1]))
    assert len(calls) == 9  # Heun: 2 calls per step, 1 for the last step to 0


def test_ddim_ends_at_sigma_min():
    sigmas = S.sigmas_for("DDIM", "Automatic", 10, TABLE)
    init, out_scale = S.latent_scales("DDIM", sigmas)
    x = start((1, 4, 8, 8), init)
    out = S.sample("DDIM", DENOISE, x, sigmas)
    want = exact_ode(x.astype(np.float64), sigmas[0], sigmas[-1])  # still noisy at sigma_min, as in VE space
    assert rel_err(out, want) < 0.1 and out_scale < 1


def test_lms_coefficients_are_adams_bashforth_on_equal_steps():
    from edgesd.schedulers.samplers import lms_coefficients

    sig = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # step -1: coefficients are -(AB weights)
    assert lms_coefficients(sig, 0, 1) == pytest.approx([-1.0])
    assert lms_coefficients(sig, 1, 2) == pytest.approx([-3 / 2, 1 / 2])
    assert lms_coefficients(sig, 2, 3) == pytest.approx([-23 / 12, 16 / 12, -5 / 12])
    assert lms_coefficients(sig, 3, 4) == pytest.approx([-55 / 24, 59 / 24, -37 / 24, 9 / 24])
    uneven = np.array([9.0, 4.0, 2.5, 1.0])
    assert sum(lms_coefficients(uneven, 2, 3)) == pytest.approx(1.0 - 2.5)  # integrates constants exactly


def test_batch_noise_uses_threads_only_for_enough_work(monkeypatch):
    """Handing a call to a thread costs about 0.1 ms: small draws run inline, large ones on the
    pool, and either way the numbers are the same."""
    import threading

    from edgesd.schedulers import normal

    monkeypatch.setattr(normal, "_THREADS", 2)
    where = []
    record = lambda i: where.append(threading.current_thread().name)  # noqa: E731
    normal.parallel(record, 2, work=normal.PARALLEL_MIN_WORK - 1)
    assert where == [threading.current_thread().name] * 2
    where.clear()
    normal.parallel(record, 2, work=normal.PARALLEL_MIN_WORK)
    assert len(where) == 2 and all(name.startswith("edgesd-noise") for name in where)
    x = np.zeros((2, 4, 8, 8), np.float32)
    sigmas = S.sigmas_for("DPM++ 2M SDE", "Automatic", 6, TABLE)
    inline = S.sample("DPM++ 2M SDE", DENOISE, start(x.shape, sigmas[0]), sigmas, seed=[1, 2])
    monkeypatch.setattr(normal, "PARALLEL_MIN_WORK", 1)
    threaded = S.sample("DPM++ 2M SDE", DENOISE, start(x.shape, sigmas[0]), sigmas, seed=[1, 2])
    np.testing.assert_array_equal(inline, threaded)
