"""Samplers in k-diffusion's form: pure functions of (denoise, x, sigmas).

`denoise(x, sigma)` returns the model's estimate of the clean latent for a latent `x` at
noise level `sigma` (a float) in variance-exploding space (x = x0 + sigma * noise).
`noise(sigma, sigma_next)` returns standard normal noise like `x`; `callback(i, sigma, x,
denoised)` reports progress. When `sigmas` ends above 0 the result is left at that level.
"""

import functools
import math

import numpy as np

from edgesd.errors import InvalidArgumentError, unknown_name


def _report(callback, i, sigma, x, denoised):
    if callback is not None:
        callback(i, sigma, x, denoised)


def linear_combination(terms):
    """sum(c * a for c, a in terms), c floats and a arrays of one shape and dtype: one pass
    per term into a single output, where chained numpy expressions make a temporary each.
    Multistep updates are linear in the latent and the stored estimates."""
    (c0, a0), *rest = terms
    out = np.multiply(a0, float(c0))
    scratch = np.empty_like(out) if rest else None
    for c, a in rest:
        out += np.multiply(a, float(c), out=scratch)
    return out


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = (x - denoised) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add sigma_up of
    fresh noise, so the result is at sigma_next; eta scales the fresh part (DDPM at 1)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(sigma_next**2 - up**2), up


def _churn(x, sigma, sigmas, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s stochastic 'churn': raise the noise level from sigma to sigma_hat.
    With churn on, noise is drawn every step (used or not), as k-diffusion does, so that
    an injected noise stream lines up with it."""
    if not s_churn:
        return x, sigma
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    z = noise(sigma, sigma * (gamma + 1))
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + z * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
    return x, sigma_hat


def euler(denoise, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the
    correction). On a DDIM timestep grid this is deterministic DDIM."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigmas, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        _report(callback, i, sigma, x, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


def euler_ancestral(denoise, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    """Euler step down to sigma_down, then fresh noise up to sigma_next. On a DDIM grid this
    is DDIM with the same eta."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        # x + (x - denoised) / sigma * (sigma_down - sigma), plus the fresh noise, in one combination
        terms = [(sigma_down / sigma, x), (1 - sigma_down / sigma, denoised)]
        if sigma_next > 0 and sigma_up > 0:
            terms.append((s_noise * sigma_up, noise(sigma, sigma_next)))
        x = linear_combination(terms)
    return x


def ddim(denoise, x, sigmas, *, noise=None, callback=None, eta=0.0, s_noise=1.0):
    """DDIM (Song et al. 2021) in sigma form: with x_ve = x_vp / sqrt(alpha_bar) its update
    x0 + sqrt(sigma_next^2 - up^2) * eps + up * z is an ancestral Euler step whose noise
    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2), so eta = 0 is Euler."""
    if not eta:
        return euler(denoise, x, sigmas, callback=callback)
    return euler_ancestral(denoise, x, sigmas, noise=noise, callback=callback, eta=eta, s_noise=s_noise)



def heun(denoise, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Heun's method (Karras et al. 2022, Algorithm 2): average the slopes at both ends;
    the last step to sigma = 0 is plain Euler."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigmas, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        _report(callback, i, sigma, x, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
    return x


def dpm_2(denoise, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Second-order midpoint steps (DPM-Solver-2 in sigma form): the slope is taken at the
    geometric mean of the two sigmas."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigmas, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        _report(callback, i, sigma, x, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = math.sqrt(sigma_hat * sigma_next)
            x_2 = x + d * (sigma_mid - sigma_hat)
            x = x + to_d(x_2, sigma_mid, denoise(x_2, sigma_mid)) * (sigma_next - sigma_hat)
    return x


def dpm_2_ancestral(denoise, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver-2 steps down to sigma_down, then fresh noise up to sigma_next."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            terms = [(1.0, denoised)]  # an Euler step to 0 lands on the estimate
        else:
            # x_2 = x + d * (sigma_mid - sigma); x + d_2 * (sigma_down - sigma), d_2 the slope at x_2
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_2 = linear_combination([(sigma_mid / sigma, x), (1 - sigma_mid / sigma, denoised)])
            c = (sigma_down - sigma) / sigma_mid
            terms = [(1.0, x), (c, x_2), (-c, denoise(x_2, sigma_mid))]
        if sigma_next > 0 and sigma_up > 0:
            terms.append((s_noise * sigma_up, noise(sigma, sigma_next)))
        x = linear_combination(terms)
    return x


@functools.lru_cache(maxsize=None)
def _gauss_legendre(n):
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple(zip(nodes.tolist(), weights.tolist()))


def lms_coefficients(sigmas, i, order):
    """Weights of d_i, d_(i-1), ... in the step from sigmas[i] to sigmas[i+1]: the integral
    over that step of each Lagrange basis polynomial through the last `order` sigmas
    (Gauss-Legendre quadrature, exact for these degree order - 1 polynomials)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    a, b = nodes[0], float(sigmas[i + 1])
    mid, half = (a + b) / 2, (b - a) / 2
    coeffs = [0.0] * order
    for u, w in _gauss_legendre(order // 2 + 1):
        tau = mid + half * u
        for j in range(order):
            basis = 1.0
            for k in range(order):
                if k != j:
                    basis *= (tau - nodes[k]) / (nodes[j] - nodes[k])
            coeffs[j] += w * half * basis
    return coeffs


def lms(denoise, x, sigmas, *, noise=None, callback=None, order=4):
    """Linear multistep: integrate the polynomial through the last `order` slopes."""
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        ds = [to_d(x, sigma, denoised)] + ds[: order - 1]
        for c, d in zip(lms_coefficients(sigmas, i, min(i + 1, order)), ds):
            x = x + c * d
    return x


def dpmpp_2s_ancestral(denoise, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S): a data-prediction midpoint step (in log sigma) to sigma_down, then
    fresh noise up to sigma_next."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            terms = [(1.0, denoised)]
        else:
            sigma_s = math.sqrt(sigma * sigma_down)
            x_2 = linear_combination([(sigma_s / sigma, x), (1 - sigma_s / sigma, denoised)])
            terms = [(sigma_down / sigma, x), (1 - sigma_down / sigma, denoise(x_2, sigma_s))]
        if sigma_next > 0 and sigma_up > 0:
            terms.append((s_noise * sigma_up, noise(sigma, sigma_next)))
        x = linear_combination(terms)
    return x


def dpmpp_sde(denoise, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """Stochastic DPM-Solver++: an ancestral substep to the point a fraction r along the step
    in log sigma, then a full ancestral step with the two denoised estimates mixed. The
    two noises are Brownian increments over overlapping intervals."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_s = sigma * (sigma_next / sigma) ** r
        fac = 1 / (2 * r)
        sd, su = ancestral_step(sigma, sigma_s, eta)
        x_2 = (sd / sigma) * x + (1 - sd / sigma) * denoised
        if su > 0:
            x_2 = x_2 + noise(sigma, sigma_s) * (s_noise * su)
        denoised_2 = denoise(x_2, sigma_s)
        sd, su = ancestral_step(sigma, sigma_next, eta)
        x = (sd / sigma) * x + (1 - sd / sigma) * ((1 - fac) * denoised + fac * denoised_2)
        if su > 0:
            x = x + noise(sigma, sigma_next) * (s_noise * su)
    return x


def dpmpp_sde_noise_levels(sigmas, r=0.5):
    """The noise levels DPM++ SDE asks its Brownian noise for: each step's sigmas and the point
    a fraction r along it (for the walk ahead of need, noise.brownian_noise)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    inner = sigma_next > 0
    return np.concatenate([sigmas, sigma[inner] * (sigma_next[inner] / sigma[inner]) ** r])


def dpmpp_2m(denoise, x, sigmas, *, noise=None, callback=None):
    """DPM-Solver++(2M): exponential-integrator step on the denoised estimate, extrapolated
    linearly (in log sigma) from the previous one; first and last steps are first order."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        if old_denoised is None:
            d = denoised
        else:
            k = h / (2 * h_last)
            d = (1 + k) * denoised - k * old_denoised
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * d
        old_denoised, h_last = denoised, h
    return x


def dpmpp_2m_sde(denoise, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE: the 2M step on the SDE with noise fraction eta; the second-order
    correction uses the midpoint or Heun form."""
    if solver_type not in ("midpoint", "heun"):
        raise unknown_name("solver_type", solver_type, ("midpoint", "heun"))
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        keep = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma * math.exp(-eta_h)) * x + keep * denoised
        if old_denoised is not None:
            ratio = h / h_last
            if solver_type == "heun":
                x = x + ((keep / (-h - eta_h) + 1) * ratio) * (denoised - old_denoised)
            else:
                x = x + (0.5 * keep * ratio) * (denoised - old_denoised)
        if eta:
            x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


def dpmpp_2m_sde_heun(denoise, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the Heun-type correction (A1111's 'DPM++ 2M SDE Heun')."""
    return dpmpp_2m_sde(denoise, x, sigmas, noise=noise, callback=callback, eta=eta, s_noise=s_noise,
                        solver_type="heun")


def dpmpp_3m_sde(denoise, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: like 2M SDE with a quadratic extrapolation through the last
    three denoised estimates."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - d_1) / r0
            d1_1 = (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif h_1 is not None:
            x = x + phi_2 * ((denoised - d_1) / (h_1 / h))
        if eta:
            x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
    return x


def _dpm_solver_step(eps_at, x, lam, lam_next, order, cache, r1=None):
    """One DPM-Solver step of order 1, 2 or 3 from lambda = -log sigma to lam_next, with
    noise predictions eps_at(key, x, lam) cached per step (keys: 'eps', 'eps_r1', 'eps_r2')."""
    sig = lambda t: math.exp(-t)
    h = lam_next - lam
    eps = eps_at(cache, "eps", x, lam)
    x_1 = x - sig(lam_next) * math.expm1(h) * eps
    if order == 1:
        return x_1
    r1 = (1 / 2 if order == 2 else 1 / 3) if r1 is None else r1
    s1 = lam + r1 * h
    u1 = x - sig(s1) * math.expm1(r1 * h) * eps
    eps_r1 = eps_at(cache, "eps_r1", u1, s1)
    if order == 2:
        return x_1 - sig(lam_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps)
    r2 = 2 / 3
    s2 = lam + r2 * h
    u2 = x - sig(s2) * math.expm1(r2 * h) * eps
    u2 = u2 - sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps)
    eps_r2 = eps_at(cache, "eps_r2", u2, s2)
    return x_1 - sig(lam_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


def _eps_getter(denoise):
    def eps_at(cache, key, x, lam):
        if key not in cache:
            sigma = math.exp(-lam)
            cache[key] = (x - denoise(x, sigma)) / sigma
        return cache[key]

    return eps_at


def _sigma_range(sigmas):
    positive = sigmas[sigmas > 0]
    return float(positive.min()), float(positive.max())


def dpm_fast(denoise, x, sigmas, *, noise, callback=None, eta=0.0, s_noise=1.0):
    """DPM-Solver-Fast (Lu et al. 2022): len(sigmas) - 1 model calls spent on third-order
    steps evenly spaced in log sigma from sigmas[0] to the smallest positive sigma; only
    that range is used, and the result is left at the smallest sigma, as in k-diffusion."""
    sigma_min, sigma_max = _sigma_range(sigmas)
    nfe = len(sigmas) - 1
    lam_end = -math.log(sigma_min)
    m = nfe // 3 + 1
    lams = np.linspace(-math.log(sigma_max), lam_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    eps_at = _eps_getter(denoise)
    for i, order in enumerate(orders):
        lam, lam_next = float(lams[i]), float(lams[i + 1])
        cache, su = {}, 0.0
        if eta:
            sd, su = ancestral_step(math.exp(-lam), math.exp(-lam_next), eta)
            lam_next_ = min(lam_end, -math.log(sd)) if sd > 0 else lam_end
            su = math.sqrt(max(math.exp(-2 * lam_next) - math.exp(-2 * lam_next_), 0.0))
        else:
            lam_next_ = lam_next
        sigma = math.exp(-lam)
        eps = eps_at(cache, "eps", x, lam)
        _report(callback, i, sigma, x, x - sigma * eps)
        x = _dpm_solver_step(eps_at, x, lam, lam_next_, order, cache)
        if su > 0:
            x = x + noise(sigma, math.exp(-lam_next)) * (su * s_noise)
    return x


def _pid_controller(h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
    """Step-size controller (Söderlind's PID form): returns propose(error) -> accepted,
    updating the step size held in state['h']."""
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order
    state = {"h": h, "errs": []}

    def propose(error):
        inv = 1 / (float(error) + eps)
        errs = state["errs"]
        if not errs:
            errs[:] = [inv, inv, inv]
        errs[0] = inv
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= accept_safety
        if accept:
            errs[2], errs[1] = errs[1], errs[0]
        state["h"] *= factor
        return accept

    return state, propose


def dpm_adaptive(denoise, x, sigmas, *, noise, callback=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                 pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-12/23 with adaptive step size: an embedded lower-order solution estimates
    the error; the number of steps is not len(sigmas) - 1 but whatever the tolerances need.
    Covers sigmas[0] down to the smallest positive sigma and stops there (k-diffusion)."""
    if order not in (2, 3):
        raise InvalidArgumentError(f"DPM adaptive order must be 2 or 3, got {order}")
    sigma_min, sigma_max = _sigma_range(sigmas)
    lam, lam_end = -math.log(sigma_max), -math.log(sigma_min)
    state, propose = _pid_controller(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    eps_at = _eps_getter(denoise)
    x_prev, step = x, 0
    while lam < lam_end - 1e-5:
        lam_next = min(lam_end, lam + state["h"])
        su = 0.0
        lam_next_ = lam_next
        if eta:
            sd, su = ancestral_step(math.exp(-lam), math.exp(-lam_next), eta)
            lam_next_ = min(lam_end, -math.log(sd)) if sd > 0 else lam_end
            su = math.sqrt(max(math.exp(-2 * lam_next) - math.exp(-2 * lam_next_), 0.0))
        cache = {}
        sigma = math.exp(-lam)
        eps = eps_at(cache, "eps", x, lam)
        _report(callback, step, sigma, x, x - sigma * eps)
        if order == 2:
            x_low = _dpm_solver_step(eps_at, x, lam, lam_next_, 1, cache)
            x_high = _dpm_solver_step(eps_at, x, lam, lam_next_, 2, cache)
        else:
            x_low = _dpm_solver_step(eps_at, x, lam, lam_next_, 2, cache, r1=1 / 3)
            x_high = _dpm_solver_step(eps_at, x, lam, lam_next_, 3, cache)
        delta = np.maximum(atol, rtol * np.maximum(np.abs(x_low), np.abs(x_prev)))
        error = np.linalg.norm(((x_low - x_high) / delta).ravel()) / math.sqrt(x.size)
        if propose(error):
            x_prev = x_low
            x = x_high
            if su > 0:
                x = x + noise(sigma, math.exp(-lam_next)) * (su * s_noise)
            lam = lam_next
        step += 1
    return x


def restart(denoise, x, sigmas, *, noise, callback=None, s_noise=1.0, restart_list=None):
    """Restart sampling (Xu et al. 2023): Heun steps, and at chosen levels jump back up to a
    higher sigma with fresh noise and descend again, contracting accumulated error.

    restart_list maps {sigma_at: [steps, times, sigma_to]}. Left None, as in A1111, runs of
    20+ steps reserve 9 steps (36+: steps // 4, twice) for restarts from 0.1 up to 2, and
    the main descent becomes a Karras schedule over the given range.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    karras = lambda n, lo, hi: (hi ** (1 / 7) + np.linspace(0, 1, n) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = np.append(karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0])), 0.0)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    at = {int(np.argmin(np.abs(sigmas - key))): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 in at:
            n, times, to = at[i + 1]
            lo_idx, hi_idx = i + 1, int(np.argmin(np.abs(sigmas - to)))
            if hi_idx < lo_idx:
                up = karras(int(n), float(sigmas[lo_idx]), float(sigmas[hi_idx]))
                pairs += [(float(a), float(b)) for a, b in zip(up[:-1], up[1:])] * int(times)
    last = None
    for step, (sigma, sigma_next) in enumerate(pairs):
        if last is not None and last < sigma:
            x = x + noise(last, sigma) * (s_noise * math.sqrt(sigma**2 - last**2))
        denoised = denoise(x, sigma)
        _report(callback, step, sigma, x, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x = x + (d + to_d(x_2, sigma_next, denoise(x_2, sigma_next))) / 2 * dt
        last = sigma_next
    return x
