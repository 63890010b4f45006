"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) plus a corrector (UniC) that
reuses the model call made at the predicted point, so the order rises by one at no cost.

Written in sigma form with data prediction: lambda = -log sigma, and the exponential
integrator step from sigma_s to sigma_t is (sigma_t / sigma_s) x + (1 - sigma_t / sigma_s)
denoised plus the higher-order differences weighted by the B(h) coefficients.
"""

import math

import numpy as np

from edgesd.errors import unknown_name

from .samplers import _report


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


def _differences(ms, lams, lam_s0, h, order):
    """Step ratios r_k and scaled differences (m_k - m0) / r_k for the k previous points."""
    rks, d1s = [], []
    for k in range(1, order):
        r = (lams[-(k + 1)] - lam_s0) / h
        rks.append(r)
        d1s.append((ms[-(k + 1)] - ms[-1]) / r)
    return rks + [1.0], d1s


def _predict(x, ms, lams, sigma, sigma_next, order, variant):
    h = math.log(sigma / sigma_next)
    rks, d1s = _differences(ms, lams, lams[-1], h, order)
    R, b, b_h, h_phi_1 = _coefficients(rks, h, order, variant)
    x_t = (sigma_next / sigma) * x - h_phi_1 * ms[-1]
    if d1s:
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        x_t = x_t - b_h * sum(float(r) * d for r, d in zip(rhos, d1s))
    return x_t


def _correct(x_prev, m_t, ms, lams, sigma_prev, sigma, order, variant):
    h = math.log(sigma_prev / sigma)
    rks, d1s = _differences(ms, lams, lams[-1], h, order)
    R, b, b_h, h_phi_1 = _coefficients(rks, h, order, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
    res = sum((float(r) * d for r, d in zip(rhos[:-1], d1s)), 0.0) + float(rhos[-1]) * (m_t - ms[-1])
    return (sigma / sigma_prev) * x_prev - h_phi_1 * ms[-1] - b_h * res


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
