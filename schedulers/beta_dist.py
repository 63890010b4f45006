"""The Beta distribution's CDF and quantile function, for the Beta schedule without scipy.

The CDF is the regularized incomplete beta I_x(a, b), evaluated with its continued
fraction (modified Lentz); the quantile inverts it by safeguarded Newton iterations, which
keep a bisection bracket so they cannot leave [0, 1].
"""

import math

import numpy as np


def _betacf(x, a, b, tol=1e-15, max_iter=500):
    """Continued fraction of I_x(a, b); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < tol:
            break
    return h


def _log_front(x, a, b):
    """log of x^a (1 - x)^b / B(a, b)."""
    return math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)


def beta_cdf(x, a, b):
    """Regularized incomplete beta function I_x(a, b) for a scalar x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x < (a + 1) / (a + b + 2):
        return math.exp(_log_front(x, a, b)) * _betacf(x, a, b) / a
    return 1.0 - math.exp(_log_front(x, a, b)) * _betacf(1.0 - x, b, a) / b


def _beta_pdf(x, a, b):
    return math.exp(_log_front(x, a, b) - math.log(x) - math.log1p(-x))


def _ppf_scalar(q, a, b, tol=1e-14):
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        err = beta_cdf(x, a, b) - q
        if err > 0:
            hi = x
        else:
            lo = x
        if abs(err) < tol or hi - lo < tol:
            break
        step = err / _beta_pdf(x, a, b)
        nxt = x - step
        x = nxt if lo < nxt < hi else 0.5 * (lo + hi)
    return x


def beta_ppf(q, a, b):
    """Quantile of Beta(a, b) (scipy.stats.beta.ppf), elementwise; float for a scalar q."""
    arr = np.asarray(q, dtype=np.float64)
    out = np.array([_ppf_scalar(float(v), float(a), float(b)) for v in arr.ravel()]).reshape(arr.shape)
    return float(out) if arr.ndim == 0 else out
