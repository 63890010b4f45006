"""Sampler and schedule names (A1111's labels, with k-diffusion, A1111 and ComfyUI
aliases), their defaults and quirks, and the entry points that use them."""

import re
from typing import Callable, NamedTuple

import numpy as np

from edgesd.errors import InvalidArgumentError, UnknownNameError, unknown_name

from . import samplers as ks
from . import schedules as sch
from . import timestep_samplers as ts
from .noise import as_noise_sampler, brownian_noise, gaussian_noise
from .tables import check_table
from .unipc import unipc


class _Sampler(NamedTuple):
    fn: Callable
    description: str
    options: dict  # option -> default
    schedule: str = "Automatic"  # what "Automatic" means for it (A1111's default)
    noise: str = ""  # "", "gaussian" or "brownian": the noise it draws when given a seed
    discard_penultimate: bool = False  # A1111 computes steps + 1 sigmas and drops the last but one
    grid: str = ""  # a timestep grid used when the schedule is Automatic
    noise_levels: Callable = None  # (sigmas, **options) -> every level its Brownian noise is asked for


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}

_SAMPLERS = {
    "Euler": _Sampler(ks.euler, "Euler steps on the probability-flow ODE; 1 model call per step", _CHURN,
                      noise="gaussian"),
    "Euler a": _Sampler(ks.euler_ancestral, "ancestral Euler: step below the next sigma, add fresh noise back",
                        _ANCESTRAL, noise="gaussian"),
    "LMS": _Sampler(ks.lms, "linear multistep (up to 4th order) on the ODE", {"order": 4}),
    "Heun": _Sampler(ks.heun, "Heun's 2nd-order method (Karras et al.); 2 model calls per step", _CHURN,
                     noise="gaussian"),
    "DPM2": _Sampler(ks.dpm_2, "DPM-Solver-2 midpoint steps; 2 calls per step", _CHURN, "Karras", "gaussian", True),
    "DPM2 a": _Sampler(ks.dpm_2_ancestral, "ancestral DPM-Solver-2", _ANCESTRAL, "Karras", "gaussian", True),
    "DPM++ 2S a": _Sampler(ks.dpmpp_2s_ancestral, "ancestral DPM-Solver++(2S) single-step", _ANCESTRAL, "Karras",
                           "gaussian"),
    "DPM++ 2M": _Sampler(ks.dpmpp_2m, "DPM-Solver++(2M) multistep; 1 call per step", {}, "Karras"),
    "DPM++ SDE": _Sampler(ks.dpmpp_sde, "stochastic DPM-Solver++ with Brownian-tree noise; 2 calls per step",
                          {"eta": 1.0, "s_noise": 1.0, "r": 0.5}, "Karras", "brownian",
                          noise_levels=lambda sigmas, r=0.5, **_: ks.dpmpp_sde_noise_levels(sigmas, r)),
    "DPM++ 2M SDE": _Sampler(ks.dpmpp_2m_sde, "DPM-Solver++(2M) SDE, midpoint correction, Brownian-tree noise",
                             {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}, "Exponential", "brownian"),
    "DPM++ 2M SDE Heun": _Sampler(ks.dpmpp_2m_sde_heun, "DPM-Solver++(2M) SDE, Heun correction, Brownian-tree noise",
                                  {"eta": 1.0, "s_noise": 1.0}, "Exponential", "brownian"),
    "DPM++ 3M SDE": _Sampler(ks.dpmpp_3m_sde, "DPM-Solver++(3M) SDE, Brownian-tree noise",
                             {"eta": 1.0, "s_noise": 1.0}, "Exponential", "brownian", True),
    "DPM fast": _Sampler(ks.dpm_fast, "DPM-Solver orders 3/2/1 on uniform log-sigma steps; len(sigmas)-1 calls",
                         {"eta": 0.0, "s_noise": 1.0}, noise="gaussian"),
    "DPM adaptive": _Sampler(ks.dpm_adaptive, "DPM-Solver-12/23 with adaptive steps; ignores the step count",
                             {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0,
                              "dcoeff": 0.0, "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0}, noise="gaussian"),
    "Restart": _Sampler(ks.restart, "Heun steps with restarts back up to higher noise (Xu et al. 2023)",
                        {"s_noise": 1.0, "restart_list": None}, "Karras", "gaussian"),
    "DDIM": _Sampler(ks.ddim, "DDIM on the 'leading' timestep grid (= Euler in sigma form; eta adds noise)",
                     {"eta": 0.0, "s_noise": 1.0}, noise="gaussian", grid="ddim"),
    "PLMS": _Sampler(ts.plms, "pseudo linear multistep (PNDM without Runge-Kutta warm-up)", {}, grid="ddim"),
    "UniPC": _Sampler(unipc, "UniPC predictor-corrector multistep (order 3, bh1 as in A1111)",
                      {"order": 3, "variant": "bh1", "lower_order_final": True}, grid="unipc"),
    "LCM": _Sampler(ts.lcm, "latent consistency model: denoise, then re-noise to the next level",
                    {"sigma_table": None}, noise="gaussian", grid="lcm"),
}

_SAMPLER_ALIASES = {
    "Euler": ["sample_euler", "k_euler"],
    "Euler a": ["sample_euler_ancestral", "euler_ancestral", "k_euler_a", "k_euler_ancestral"],
    "LMS": ["sample_lms", "k_lms", "lms_discrete"],
    "Heun": ["sample_heun", "k_heun"],
    "DPM2": ["sample_dpm_2", "dpm_2", "k_dpm_2"],
    "DPM2 a": ["sample_dpm_2_ancestral", "dpm_2_ancestral", "k_dpm_2_a"],
    "DPM++ 2S a": ["sample_dpmpp_2s_ancestral", "dpmpp_2s_ancestral", "k_dpmpp_2s_a"],
    "DPM++ 2M": ["sample_dpmpp_2m", "dpmpp_2m", "k_dpmpp_2m"],
    "DPM++ SDE": ["sample_dpmpp_sde", "dpmpp_sde", "k_dpmpp_sde"],
    "DPM++ 2M SDE": ["sample_dpmpp_2m_sde", "dpmpp_2m_sde", "k_dpmpp_2m_sde"],
    "DPM++ 2M SDE Heun": ["dpmpp_2m_sde_heun", "k_dpmpp_2m_sde_heun"],
    "DPM++ 3M SDE": ["sample_dpmpp_3m_sde", "dpmpp_3m_sde", "k_dpmpp_3m_sde"],
    "DPM fast": ["sample_dpm_fast", "dpm_fast", "k_dpm_fast"],
    "DPM adaptive": ["sample_dpm_adaptive", "dpm_adaptive", "k_dpm_ad"],
    "Restart": ["sample_restart", "restart"],
    "DDIM": ["ddim"],
    "PLMS": ["plms", "pndm"],
    "UniPC": ["uni_pc", "unipc", "uni_pc_bh1"],
    "LCM": ["lcm", "sample_lcm"],
}

_SCHEDULES = {
    "Automatic": (None, "the sampler's own default (A1111's choice per sampler)"),
    "Uniform": (sch.uniform, "evenly spaced training timesteps (k-diffusion's default)"),
    "Karras": (sch.karras, "Karras et al. rho = 7: dense at low noise"),
    "Exponential": (sch.exponential, "evenly spaced in log sigma"),
    "Polyexponential": (sch.polyexponential, "log sigma polynomial in the step (rho = 1)"),
    "SGM Uniform": (sch.sgm_uniform, "uniform timesteps, n of n + 1 (never lands on sigma_min)"),
    "KL Optimal": (sch.kl_optimal, "evenly spaced in arctan(sigma); ends at sigma_min"),
    "Align Your Steps": (sch.align_your_steps, "NVIDIA's optimised 10-step table, resampled (SD1.5 or SDXL)"),
    "Simple": (sch.simple, "every (1000/n)-th training sigma"),
    "Normal": (sch.normal, "evenly spaced timesteps between sigma_max and sigma_min"),
    "DDIM": (sch.ddim, "training sigmas on DDIM's timestep grid 1, 1+k, ..."),
    "Beta": (sch.beta, "Beta(0.6, 0.6) quantiles of the sigma range: dense at both ends"),
}

_SCHEDULE_ALIASES = {
    "Automatic": ["auto", "default"],
    "SGM Uniform": ["sgm_uniform", "sgmuniform"],
    "KL Optimal": ["kl_optimal"],
    "Align Your Steps": ["align_your_steps", "ays"],
}

SAMPLERS = {name: spec.description for name, spec in _SAMPLERS.items()}
SCHEDULES = {name: desc for name, (_, desc) in _SCHEDULES.items()}


def _key(name):
    return re.sub(r"[^a-z0-9]", "", str(name).lower().replace("++", "pp"))


def _index(canon, aliases):
    table = {_key(n): n for n in canon}
    for n, names in aliases.items():
        table.update({_key(a): n for a in names})
    return table


_SAMPLER_INDEX = _index(_SAMPLERS, _SAMPLER_ALIASES)
_SCHEDULE_INDEX = _index(_SCHEDULES, _SCHEDULE_ALIASES)


def resolve_sampler(name):
    """Canonical (A1111) sampler name for any accepted spelling or alias."""
    found = _SAMPLER_INDEX.get(_key(name))
    if found is None:
        raise unknown_name("sampler", name, SAMPLERS)
    return found


def resolve_schedule(name):
    """Canonical (A1111) schedule name for any accepted spelling or alias; None = Automatic."""
    found = _SCHEDULE_INDEX.get(_key("Automatic" if name is None else name))
    if found is None:
        raise unknown_name("schedule", name, SCHEDULES)
    return found


def split_sampler_label(label):
    """(sampler, schedule) from a sampler name that may carry a schedule, as older A1111
    infotexts write them ("DPM++ 2M Karras", "DPM++ 3M SDE Exponential")."""
    try:
        return resolve_sampler(label), "Automatic"
    except UnknownNameError:
        pass
    words = str(label).split()
    for cut in range(len(words) - 1, 0, -1):
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        if _key(head) in _SAMPLER_INDEX and _key(tail) in _SCHEDULE_INDEX:
            return resolve_sampler(head), resolve_schedule(tail)
    raise unknown_name("sampler", label, SAMPLERS)


def get_sigmas(schedule, steps, sigma_table, *, sigma_min=None, sigma_max=None, rho=None, ays_model="sd15",
               alpha=0.6, beta=0.6):
    """Descending float64 sigmas of `schedule` for `steps` steps over the table's range.

    `sigma_min`/`sigma_max` override the table's ends where the schedule uses a range;
    `rho` applies to Karras and Polyexponential, `ays_model` ("sd15"/"sdxl") to Align Your
    Steps, `alpha`/`beta` to Beta. "Automatic" here is k-diffusion's uniform default.
    """
    name = resolve_schedule(schedule)
    table = check_table(sigma_table)
    steps = int(steps)
    if steps < 1:
        raise InvalidArgumentError(f"steps must be >= 1, got {steps}")
    lo = float(table[0] if sigma_min is None else sigma_min)
    hi = float(table[-1] if sigma_max is None else sigma_max)
    if not 0 < lo < hi:
        raise InvalidArgumentError(f"need 0 < sigma_min < sigma_max, got {lo} and {hi}")
    fn = _SCHEDULES[name][0] or sch.uniform
    extra = {}
    if name in ("Karras", "Polyexponential") and rho is not None:
        extra["rho"] = float(rho)
    elif name == "Align Your Steps":
        if ays_model not in sch.AYS_SIGMAS:
            raise unknown_name("Align Your Steps model", ays_model, sch.AYS_SIGMAS)
        extra["ays_model"] = ays_model
    elif name == "Beta":
        extra = {"alpha": float(alpha), "beta": float(beta)}
    return np.asarray(fn(steps, table, lo, hi, **extra), dtype=np.float64)


def timestep_grid(grid, steps, sigma_table, original_steps=50):
    """(timesteps, sigmas) of a timestep sampler's own grid; sigmas has one more entry, the
    level the last step lands on.

    ddim (DDIM, PLMS): diffusers' 'leading' spacing with steps_offset 1, t = 1 + k * (T // n),
    ending at sigma(t = 0) because SD's set_alpha_to_one is False. unipc: A1111's
    time-uniform grid, n + 1 fractional timesteps from T - 1 to 0 with log alpha_bar
    interpolated linearly (its VP noise schedule), ending at sigma(0). lcm: n of the
    `original_steps` LCM timesteps (T/50 - 1, 2T/50 - 1, ...) as diffusers picks them, then 0.
    """
    table = check_table(sigma_table)
    T, steps = len(table), int(steps)
    if grid == "ddim":
        if steps > T:
            raise InvalidArgumentError(f"DDIM takes at most {T} steps, got {steps}")
        t = np.arange(steps)[::-1] * (T // steps) + 1
        return t, np.append(table[t], table[0])
    if grid == "unipc":
        tau = np.linspace(T - 1, 0, steps + 1)
        log_abar = np.interp(tau, np.arange(T), -np.log1p(table**2))
        return tau[:-1], np.sqrt(np.expm1(-log_abar))
    if grid == "lcm":
        if steps > original_steps:
            raise InvalidArgumentError(f"LCM takes at most {original_steps} steps, got {steps}")
        origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
        t = origin[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]
        return t, np.append(table[t], 0.0)
    raise unknown_name("timestep grid", grid, ("ddim", "unipc", "lcm"))


def sigmas_for(sampler, schedule, steps, sigma_table, **schedule_options):
    """The sigmas `sampler` steps through for `schedule` and `steps`, as A1111 builds them.

    "Automatic" means the sampler's A1111 default schedule, or for DDIM, PLMS, UniPC and LCM
    the sigmas of their own timestep grids (see `timestep_grid`; DDIM's, PLMS's and UniPC's
    end at sigma_min, not 0). DPM2, DPM2 a and
    DPM++ 3M SDE get steps + 1 sigmas with the last but one dropped, as in A1111. With any
    other schedule the timestep samplers use that schedule's sigmas.
    """
    spec = _SAMPLERS[resolve_sampler(sampler)]
    table = check_table(sigma_table)
    name = resolve_schedule(schedule)
    steps = int(steps)
    if steps < 1:
        raise InvalidArgumentError(f"steps must be >= 1, got {steps}")
    if name == "Automatic" and spec.grid:
        return timestep_grid(spec.grid, steps, table)[1]
    if name == "Automatic":
        name = spec.schedule
    if spec.discard_penultimate:
        sigmas = get_sigmas(name, steps + 1, table, **schedule_options)
        return np.append(sigmas[:-2], sigmas[-1])
    return get_sigmas(name, steps, table, **schedule_options)


def _check_number_option(key: str, value, default) -> None:
    """A numeric option must be a number: finite, or infinite where its default is (s_tmax)."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if np.isnan(number) or (np.isinf(number) and np.isfinite(default)) or isinstance(value, bool):
        raise InvalidArgumentError(f"{key} must be a finite number, got {value!r}")


def sample(sampler, denoise, x, sigmas, *, seed=None, noise=None, callback=None, noise_ahead=False, **options):
    """Run `sampler` from latent `x` (already at noise level sigmas[0]) down the `sigmas`.

    `denoise(x, sigma)` returns the clean-latent estimate. Stochastic samplers draw their
    noise from `noise` if given (a callable taking no argument or (sigma, sigma_next)),
    else from per-image streams seeded by `seed` (an int n -> n, n+1, ... per image, or one
    int per image), else from fresh entropy. The SDE samplers use a Brownian tree so their
    noise does not depend on the step count; `noise_ahead` queues the walk to the next noise
    level, which a worker thread does once `denoise` calls `schedulers.normal.host_idle()`
    right before its model leaves the host idle (a GPU UNet), or inline when the noise is
    needed. Returns the final latent (VE space).
    """
    name = resolve_sampler(sampler)
    spec = _SAMPLERS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise InvalidArgumentError(f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; valid: {valid}")
    for key, value in options.items():
        _check_number_option(key, value, spec.options[key])
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or np.any(sigmas < 0) or not np.all(np.isfinite(sigmas)):
        raise InvalidArgumentError("sigmas must be a 1-D array of at least 2 finite noise levels >= 0")
    if noise is not None:
        noise_fn = as_noise_sampler(noise, x)
    elif spec.noise == "brownian":
        positive = sigmas[sigmas > 0]
        levels = spec.noise_levels(sigmas, **options) if spec.noise_levels else sigmas
        noise_fn = brownian_noise(x, positive.min(), positive.max(), seed, lookahead=levels if noise_ahead else None)
    else:
        noise_fn = gaussian_noise(x, seed)
    return spec.fn(denoise, x, sigmas, noise=noise_fn, callback=callback, **options)


def latent_scales(sampler, sigmas, schedule="Automatic"):
    """(init, out): start from unit noise * init, and multiply the sampler's result by out.

    k-diffusion samplers start at noise * sigmas[0] and return their result as is. DDIM,
    PLMS and UniPC on their own timestep grids (schedule "Automatic") are timestep samplers
    in A1111 and diffusers: they start from unit VP noise, which in sigma form is
    noise * sqrt(1 + sigma0^2), and end with a VP latent at sigmas[-1], i.e. the result
    divided by sqrt(1 + sigma_last^2). With another schedule they run as k-samplers.
    """
    name = resolve_sampler(sampler)
    first, last = float(sigmas[0]), float(sigmas[-1])
    if name in ("DDIM", "PLMS", "UniPC") and resolve_schedule(schedule) == "Automatic":
        return (1 + first**2) ** 0.5, 1 / (1 + last**2) ** 0.5
    return first, 1.0


def initial_noise_scale(sampler, schedule, sigmas):
    """What unit initial noise is multiplied by before `sample` (see `latent_scales`)."""
    return latent_scales(sampler, sigmas, schedule)[0]


def noise_kind(sampler):
    """The noise a sampler draws each step: "" (none), "gaussian" or "brownian".

    Callers that own the random streams (A1111-exact seeds) inject per-step noise for
    "gaussian" samplers; "brownian" ones need noise consistent across step counts, which
    `sample` builds from the seeds itself.
    """
    return _SAMPLERS[resolve_sampler(sampler)].noise
