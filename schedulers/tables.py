"""The model's training noise levels, the map between them and timesteps, and the
input/output scalings of an eps- or v-prediction model seen as a denoiser.

Everything is float64 numpy. Sigmas live in the variance-exploding space of
Karras et al. (2022): x = x0 + sigma * noise; a VP latent is that times sqrt(alpha_bar).
"""

import math

import numpy as np

from edgesd.errors import InvalidArgumentError, unknown_name

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# A1111 replaces the zero alpha_bar of a zero-terminal-SNR schedule by this value so the
# last sigma stays finite (~4518.8); a denoiser cannot be evaluated at sigma = inf.
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def _cosine_betas(steps, max_beta=0.999):
    """Betas of the 'squaredcos_cap_v2' schedule (Nichol & Dhariwal's cosine alpha_bar)."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)])


def _betas(beta_schedule, beta_start, beta_end, steps):
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, steps)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, steps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(steps)
    raise unknown_name("beta schedule", beta_schedule, BETA_SCHEDULES)


def alphas_cumprod(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps=1000,
                   rescale_zero_terminal_snr=False):
    """alpha_bar_t for t = 0..steps-1, as diffusers' schedulers define it (in float64)."""
    abar = np.cumprod(1.0 - _betas(beta_schedule, beta_start, beta_end, steps))
    if rescale_zero_terminal_snr:
        # Lin et al. (2023), Algorithm 1: shift and scale sqrt(alpha_bar) so that the last
        # one is 0 and the first one is unchanged.
        s = np.sqrt(abar)
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        abar = s**2
        abar[-1] = ZTSNR_LAST_ALPHA_BAR
    return abar


def sigma_table(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps=1000,
                rescale_zero_terminal_snr=False):
    """The training sigmas sqrt((1 - alpha_bar) / alpha_bar), ascending (index = timestep).

    With `rescale_zero_terminal_snr` the last alpha_bar would be 0 (sigma = inf); like A1111
    it is clamped to 4.897e-8, giving a finite sigma_max of about 4518.8.
    """
    abar = alphas_cumprod(beta_schedule, beta_start, beta_end, steps, rescale_zero_terminal_snr)
    return np.sqrt((1.0 - abar) / abar)


def _as_out(value, like):
    return float(value) if np.ndim(like) == 0 else value


def sigma_to_t(sigma, table):
    """Fractional timestep of `sigma`: linear interpolation of log sigma between table
    entries, clamped to [0, len(table) - 1] (k-diffusion's DiscreteSchedule)."""
    table = np.asarray(table, dtype=np.float64)
    t = np.interp(np.log(np.asarray(sigma, dtype=np.float64)), np.log(table), np.arange(len(table), dtype=np.float64))
    return _as_out(t, sigma)


def t_to_sigma(t, table):
    """Sigma at a fractional timestep: log sigma interpolated linearly between entries."""
    table = np.asarray(table, dtype=np.float64)
    s = np.exp(np.interp(np.asarray(t, dtype=np.float64), np.arange(len(table), dtype=np.float64), np.log(table)))
    return _as_out(s, t)


def scalings(sigma, prediction_type="epsilon"):
    """(c_skip, c_out, c_in) so that denoised = x * c_skip + model(x * c_in, t) * c_out.

    epsilon: the model predicts the noise; v_prediction: it predicts v = alpha*eps - sigma_vp*x0
    (k-diffusion's CompVisVDenoiser, sigma_data = 1); sample: it predicts x0 directly.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    c_in = 1.0 / np.sqrt(sigma**2 + 1.0)
    if prediction_type == "epsilon":
        c_skip, c_out = np.ones_like(sigma), -sigma
    elif prediction_type == "v_prediction":
        c_skip, c_out = 1.0 / (sigma**2 + 1.0), -sigma * c_in
    elif prediction_type == "sample":
        c_skip, c_out = np.zeros_like(sigma), np.ones_like(sigma)
    else:
        raise unknown_name("prediction type", prediction_type, PREDICTION_TYPES)
    if sigma.ndim == 0:
        return float(c_skip), float(c_out), float(c_in)
    return c_skip, c_out, c_in


def check_table(table):
    """The table as a float64 array, or an InvalidArgumentError saying why it is unusable."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 1 or len(table) < 2 or not np.all(np.isfinite(table)) or np.any(table <= 0) \
            or np.any(np.diff(table) <= 0):
        raise InvalidArgumentError("sigma_table must be a 1-D ascending array of positive finite sigmas")
    return table
