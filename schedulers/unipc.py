"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) plus a corrector (UniC) that
reuses the model call made at the predicted point, so the order rises by one at no cost.

Written in sigma form with data prediction: lambda = -log sigma, and the exponential
integrator step from sigma_s to sigma_t is (sigma_t / sigma_s) x + (1 - sigma_t / sigma_s)
denoised plus the higher-order differences weighted by the B(h) coefficients.
"""

import math

import numpy as np

from edgesd.errors import unknown_name

from .samplers import _report, linear_combination


def _coefficients(rks, h, order, variant):
    """R (powers of the step ratios), b (phi-function moments / B(h)) and B(h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else h_phi_1
    R, b, factorial = [], [], 1
    for j in range(1, order + 1):
        R.append(np.asarray(rks, dtype=np.float64) ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.array(R), np.array(b), b_h, h_phi_1


def _ratios(lams, h, order):
    """Step ratios r_k of the k previous points, and 1 for the current one."""
    return [(lams[-(k + 1)] - lams[-1]) / h for k in range(1, order)] + [1.0]


def _difference_terms(ms, rks, rhos, b_h):
    """-b_h * sum_k rho_k (m_k - m0) / r_k as (coefficient, array) terms: the m0 coefficient
    and one term per previous point."""
    weights = [b_h * float(rho) / r for rho, r in zip(rhos, rks[:-1])]
    return sum(weights), [(-w, ms[-(k + 2)]) for k, w in enumerate(weights)]


def _predict(x, ms, lams, sigma, sigma_next, order, variant):
    h = math.log(sigma / sigma_next)
    rks = _ratios(lams, h, order)
    R, b, b_h, h_phi_1 = _coefficients(rks, h, order, variant)
    rhos = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    m0, previous = _difference_terms(ms, rks, rhos, b_h)
    return linear_combination([(sigma_next / sigma, x), (m0 - h_phi_1, ms[-1])] + previous)


def _correct(x_prev, m_t, ms, lams, sigma_prev, sigma, order, variant):
    h = math.log(sigma_prev / sigma)
    rks = _ratios(lams, h, order)
    R, b, b_h, h_phi_1 = _coefficients(rks, h, order, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
    m0, previous = _difference_terms(ms, rks, rhos[:-1], b_h)
    rho_t = b_h * float(rhos[-1])
    return linear_combination([(sigma / sigma_prev, x_prev), (m0 + rho_t - h_phi_1, ms[-1]), (-rho_t, m_t)]
                              + previous)


def unipc(denoise, x, sigmas, *, noise=None, callback=None, order=3, variant="bh1", lower_order_final=True):
    """UniPC multistep, data prediction, `order` 1-3, B(h) variant 'bh1' (B = h, A1111's
    default) or 'bh2' (B = e^h - 1, diffusers' default). Warm-up steps use lower orders; with
    lower_order_final so do the last ones. No corrector after the last step; a final step
    to sigma = 0 returns the denoised estimate."""
    if variant not in ("bh1", "bh2"):
        raise unknown_name("UniPC variant", variant, ("bh1", "bh2"))
    order = int(order)
    n = len(sigmas) - 1
    ms, lams = [], []
    x_prev = None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if x_prev is not None:
            x = _correct(x_prev, denoised, ms, lams, float(sigmas[i - 1]), sigma, prev_order, variant)
        ms, lams = (ms + [denoised])[-order:], (lams + [-math.log(sigma)])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        prev_order = min(this_order, i + 1)
        x_prev = x
        if sigma_next == 0:
            x = denoised
        else:
            x = _predict(x, ms, lams, sigma, sigma_next, prev_order, variant)
    return x
