"""Seeded Gaussian noise that reproduces what torch (and A1111) draw, using numpy only.

A seed only reproduces an image if the initial latent noise is the *same bits* the
reference implementation produced, so this module re-implements two generators exactly
rather than approximately:

* ``"cpu"``: ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` on the
  CPU (A1111's "CPU" RNG source and diffusers' CPU generators). torch uses an mt19937
  stream and two different ``normal_`` algorithms depending on the tensor size; both are
  reproduced below, including how each one consumes the stream, so successive draws on
  one generator stay in step with torch.
* ``"nv"``: A1111's "NV" source (``modules/rng_philox.py``), Philox-4x32-10 plus a
  Box-Muller with ``sin`` that imitates CUDA ``torch.randn``. A1111 itself computes this
  noise with numpy on the CPU, so matching its numpy arithmetic reproduces its noise.

The runtime never imports torch; torch is only used by the tests, as the oracle.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from edgesd.errors import InvalidArgumentError, unknown_name

__all__ = [
    "SOURCES",
    "CpuGenerator",
    "NvGenerator",
    "make_generator",
    "philox4x32",
    "randn_cpu",
    "randn_nv",
    "slerp",
]

SOURCES = ("cpu", "nv")
CPU_KERNELS = ("avx2", "generic")

_U64 = (1 << 64) - 1
_SEED_MIN = -(1 << 63)  # torch.Generator.manual_seed accepts [-2**63, 2**64 - 1]


# ---------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------


def _normalize_seed(seed) -> int:
    """Return ``seed`` as torch stores it (an unsigned 64-bit value).

    torch's ``manual_seed`` takes any integer in [-2**63, 2**64 - 1] and reinterprets
    negatives as two's complement; anything else is refused there, so it is refused here
    too, with a message that says what is accepted.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(
            f"seed must be an integer, got {type(seed).__name__} {seed!r}"
        )
    seed = int(seed)
    if not _SEED_MIN <= seed <= _U64:
        raise InvalidArgumentError(
            f"seed {seed} is out of range: it must be an integer in "
            f"[-2**63, 2**64 - 1] (negative seeds wrap modulo 2**64, as in torch)"
        )
    return seed & _U64


def _normalize_shape(shape) -> tuple:
    """Return ``shape`` as a tuple of non-negative ints (an int means a 1-D shape)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise InvalidArgumentError(
            f"shape must be an int or a sequence of ints, got {shape!r}"
        ) from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"shape must not have negative sizes, got {dims}")
    return dims


# ---------------------------------------------------------------------------------------
# mt19937, as torch runs it (aten/src/ATen/core/MT19937RNGEngine.h)
# ---------------------------------------------------------------------------------------

_MT_N, _MT_M = 624, 397
_MATRIX_A = np.uint32(0x9908B0DF)
_UPPER = np.uint32(0x80000000)
_LOWER = np.uint32(0x7FFFFFFF)


def _mt_init(seed: int) -> np.ndarray:
    """The seeded mt19937 state. Only the low 32 bits of the seed matter, as in torch."""
    state = [seed & 0xFFFFFFFF]
    for j in range(1, _MT_N):
        prev = state[-1]
        state.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.array(state, dtype=np.uint32)


def _mt_mix(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The mt19937 twist term: top bit of ``u`` joined to the low 31 bits of ``v``,
    shifted right, xored with the matrix constant when ``v`` is odd."""
    y = (u & _UPPER) | (v & _LOWER)
    return (y >> np.uint32(1)) ^ ((np.uint32(0) - (v & np.uint32(1))) & _MATRIX_A)


def _mt_twist(s: np.ndarray) -> np.ndarray:
    """The next 624-word state, vectorised.

    Word i depends on old words i, i+1 and on word i+397, which is already *new* once
    i >= 227; splitting the update at 227, 454 and 623 makes every slice depend only on
    values computed by earlier slices, so each slice is one array expression.
    """
    new = np.empty_like(s)
    k = _MT_N - _MT_M  # 227
    new[:k] = s[_MT_M:] ^ _mt_mix(s[:k], s[1 : k + 1])
    new[k : 2 * k] = new[:k] ^ _mt_mix(s[k : 2 * k], s[k + 1 : 2 * k + 1])
    new[2 * k : _MT_N - 1] = new[k : _MT_M - 1] ^ _mt_mix(s[2 * k : -1], s[2 * k + 1 :])
    new[-1:] = new[_MT_M - 1 : _MT_M] ^ _mt_mix(s[-1:], new[:1])
    return new


def _mt_temper(y: np.ndarray) -> np.ndarray:
    """mt19937 output tempering, applied to a whole array of state words at once."""
    y = y ^ (y >> np.uint32(11))
    y = y ^ ((y << np.uint32(7)) & np.uint32(0x9D2C5680))
    y = y ^ ((y << np.uint32(15)) & np.uint32(0xEFC60000))
    return y ^ (y >> np.uint32(18))


class _MT19937:
    """torch's mt19937 engine: 32-bit draws, produced a whole state block at a time.

    A freshly seeded torch engine twists before its first draw, which ``pos = 624``
    (block exhausted) reproduces.
    """

    def __init__(self, seed: int):
        self.state = _mt_init(seed)
        self.pos = _MT_N

    def draw(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs of the stream, as uint32."""
        parts = []
        while n > 0:
            if self.pos == _MT_N:
                self.state = _mt_twist(self.state)
                self.pos = 0
            take = min(n, _MT_N - self.pos)
            parts.append(self.state[self.pos : self.pos + take])
            self.pos += take
            n -= take
        if not parts:
            return np.empty(0, dtype=np.uint32)
        return _mt_temper(np.concatenate(parts))


# ---------------------------------------------------------------------------------------
# float32 arithmetic exactly as the compiled torch kernels do it
# ---------------------------------------------------------------------------------------

_F32 = np.float32


def _fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add ``a * b + c`` with a single rounding.

    torch's AVX2 kernels are compiled with FMA contraction, so several ``mul`` + ``add``
    pairs round once, not twice. numpy has no fma, so: the product of two float32 is
    exact in float64 and the float64 sum is rounded to float32. That second rounding can
    only go wrong when the float64 sum landed exactly on a float32 halfway point (or in
    the subnormal range); those rare elements are redone from the exact error of the sum.
    """
    p = np.asarray(np.multiply(a, b, dtype=np.float64))
    c = np.asarray(c, dtype=np.float64)
    s = np.asarray(p + c)
    out = np.array(s, dtype=np.float32)
    low = s.view(np.int64) & 0x1FFFFFFF  # the 29 bits float32 drops from a float64
    suspect = (low == 0x10000000) | (np.abs(s) < 2.0**-126)
    if suspect.any():
        p, c = np.broadcast_arrays(p, c)
        out[suspect] = _sum_to_f32(p[suspect], c[suspect])
    return out


def _sum_to_f32(p: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 rounding of the exact ``p + c`` (float64 inputs), with no double rounding.

    TwoSum gives the error of the float64 sum; when it is inexact, stepping an even last
    bit to the odd neighbour on the side of the exact value ("round to odd") keeps the
    information the float32 rounding needs (53 >= 2 * 24 + 2 bits).
    """
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    bits = s.view(np.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    step = np.where((err > 0) == (s > 0), 1, -1)  # +1 moves away from zero
    return (bits + fix * step).view(np.float64).astype(np.float32)


def _cephes_log(x: np.ndarray) -> np.ndarray:
    """``log256_ps`` from torch's ``avx_mathfun.h``: a Cephes float32 polynomial log.

    Only valid for the positive normal inputs the Box-Muller feeds it (``1 - u`` with
    ``u`` on a 2**-24 grid). The order of roundings and which ``mul + add`` pairs are
    fused follow the GCC build of the torch AVX2 kernel, so the result is bit-identical.
    """
    bits = x.view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 0x7F).astype(np.float32) + _F32(1)
    m = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(np.float32)
    small = m < _F32(0.707106781186547524)
    e = e - np.where(small, _F32(1), _F32(0))
    m = (m - _F32(1)) + np.where(small, m, _F32(0))
    z = m * m
    y = np.full_like(m, _F32(7.0376836292e-2))
    for coef in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                 -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = _fma32(y, m, _F32(coef))
    y = y * m
    y = _fma32(y, z, e * _F32(-2.12194440e-4))
    y = _fma32(-z, _F32(0.5), y)
    return _fma32(e, _F32(0.693359375), m + y)


def _cephes_sincos(x: np.ndarray):
    """``sincos256_ps`` from ``avx_mathfun.h`` for ``x >= 0``: returns ``(sin, cos)``.

    Cephes range reduction to [-pi/4, pi/4] in three fused steps, then the sine and
    cosine polynomials, each result taken from whichever polynomial the octant needs.
    """
    j = (x * _F32(1.27323954473516)).astype(np.int32)  # truncation, like cvttps
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    x = _fma32(y, _F32(-0.78515625), x)
    x = _fma32(y, _F32(-2.4187564849853515625e-4), x)
    x = _fma32(y, _F32(-3.77489497744594108e-8), x)
    sin_neg = (j & 4) != 0
    cos_neg = ((j - 2) & 4) == 0
    use_sin_poly = (j & 2) == 0

    z = x * x
    c = _fma32(_F32(2.443315711809948e-5), z, _F32(-1.388731625493765e-3))
    c = _fma32(c, z, _F32(4.166664568298827e-2))
    c = c * z
    c = _fma32(c, z, -(z * _F32(0.5))) + _F32(1)
    s = _fma32(_F32(-1.9515295891e-4), z, _F32(8.3321608736e-3))
    s = _fma32(s, z, _F32(-1.6666654611e-1))
    s = s * z
    s = _fma32(s, x, x)

    # The kernel selects by masking and adding +0.0, which also turns -0.0 into +0.0.
    sin_v = np.where(use_sin_poly, s, c) + _F32(0)
    cos_v = np.where(use_sin_poly, c, s) + _F32(0)
    return np.where(sin_neg, -sin_v, sin_v), np.where(cos_neg, -cos_v, cos_v)


# ---------------------------------------------------------------------------------------
# torch.randn on the CPU (aten/src/ATen/native/cpu/DistributionTemplates.h)
# ---------------------------------------------------------------------------------------

_TWO_PI_F32 = _F32(2.0 * math.pi)
_DOUBLE_53 = (1 << 53) - 1


def _uniform_f32(words: np.ndarray) -> np.ndarray:
    """``uniform_real_distribution<float>(0, 1)``: the low 24 bits of a draw times 2**-24."""
    return (words & np.uint32(0xFFFFFF)).astype(np.float32) * _F32(2.0**-24)


def _box_muller16_avx2(u: np.ndarray) -> np.ndarray:
    """``normal_fill_16_AVX2`` on rows of 16 uniforms: pairs lane j with lane j + 8."""
    radius = np.sqrt(_F32(-2) * _cephes_log(_F32(1) - u[:, :8]))
    sin_t, cos_t = _cephes_sincos(_TWO_PI_F32 * u[:, 8:])
    return np.concatenate([radius * cos_t, radius * sin_t], axis=1) + _F32(0)


def _box_muller16_generic(u: np.ndarray) -> np.ndarray:
    """``normal_fill_16`` (torch's build without AVX2: ``ATEN_CPU_CAPABILITY=default``, non-x86).

    That kernel calls libm's float ``logf``/``cosf``/``sinf``, which are not correctly
    rounded; here they are evaluated in float64 and rounded, so against glibc-backed
    torch about 1.5% of the values differ, by one or two units in the last place.
    """
    u1 = (_F32(1) - u[:, :8]).astype(np.float64)
    radius = np.sqrt(_F32(-2) * np.log(u1).astype(np.float32))
    theta = (2.0 * math.pi * u[:, 8:].astype(np.float64)).astype(np.float32)
    theta = theta.astype(np.float64)
    cos_t = np.cos(theta).astype(np.float32)
    sin_t = np.sin(theta).astype(np.float32)
    return np.concatenate([radius * cos_t, radius * sin_t], axis=1) + _F32(0)


_BOX_MULLER16 = {"avx2": _box_muller16_avx2, "generic": _box_muller16_generic}


class CpuGenerator:
    """A numpy twin of a CPU ``torch.Generator`` for ``randn`` of float32 tensors.

    State carried between calls mirrors torch's: the mt19937 stream position and the
    cached second Box-Muller value that the small-tensor path leaves behind. Successive
    ``randn`` calls therefore equal successive ``torch.randn(..., generator=g)`` calls,
    which ancestral samplers rely on for their per-step noise.

    Tensors under 16 elements come out the same on every torch build. For larger ones
    torch's result depends on the kernel its CPU dispatch picks, so ``kernel`` says which
    one to imitate: ``"avx2"`` (x86-64 CPUs with AVX2, AVX512 ones included: torch's AVX512
    build compiles the same AVX2 fill; verified bit-exact against Linux torch on both, whose
    GCC build fuses multiply-adds; a build made by another compiler may fuse differently) or
    ``"generic"`` (torch's scalar code, which its default build and, going by the source,
    non-x86 builds run; close but not bit-exact, see `_box_muller16_generic`).
    """

    def __init__(self, seed: int, kernel: str = "avx2"):
        if kernel not in _BOX_MULLER16:
            raise unknown_name("cpu rng kernel", kernel, CPU_KERNELS)
        self.kernel = kernel
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "CpuGenerator":
        """Restart the stream, like ``torch.Generator.manual_seed`` (also drops the cache)."""
        self.seed = _normalize_seed(seed)
        self._mt = _MT19937(self.seed)
        self._cached_normal = None
        return self

    def randn(self, shape) -> np.ndarray:
        """Standard normal float32 array of ``shape``, bit-equal to torch's CPU randn."""
        shape = _normalize_shape(shape)
        n = math.prod(shape)
        if n >= 16:
            out = self._normal_fill(n)
        else:
            out = np.array([self._normal_double() for _ in range(n)], dtype=np.float32)
        return out.reshape(shape)

    def _normal_fill(self, n: int) -> np.ndarray:
        """torch's path for 16+ elements: uniforms for everything, Box-Muller per 16.

        When ``n`` is not a multiple of 16, torch draws 16 *more* uniforms and redoes the
        last 16 outputs with them, overwriting part of the last full block.
        """
        box_muller = _BOX_MULLER16[self.kernel]
        data = _uniform_f32(self._mt.draw(n))
        full = n - n % 16
        out = np.empty(n, dtype=np.float32)
        out[:full] = box_muller(data[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:
            tail = _uniform_f32(self._mt.draw(16)).reshape(1, 16)
            out[n - 16 :] = box_muller(tail).reshape(-1)
        return out

    def _uniform_double(self) -> float:
        """``uniform_real_distribution<double>``: 53 bits of two draws (high word first)."""
        hi, lo = (int(w) for w in self._mt.draw(2))
        return (((hi << 32) | lo) & _DOUBLE_53) * 2.0**-53

    def _normal_double(self) -> float:
        """``normal_distribution<double>``, used by torch for tensors under 16 elements.

        Each Box-Muller yields two values; the second is cached in the generator and
        returned by the next scalar draw, even one made by a later ``randn`` call.
        """
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._uniform_double()
        u2 = self._uniform_double()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = r * math.sin(theta)
        return r * math.cos(theta)


def randn_cpu(seed: int, shape, dtype=np.float32, kernel: str = "avx2") -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``, in numpy.

    The noise is always drawn as torch draws float32 and only then cast to ``dtype``
    (what A1111 and diffusers do before running a half-precision model).
    """
    return CpuGenerator(seed, kernel).randn(shape).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------
# Philox-4x32-10 and A1111's "NV" source (modules/rng_philox.py)
# ---------------------------------------------------------------------------------------

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def _mulhilo(a: np.ndarray, m: np.uint64):
    """High and low 32-bit halves of the 64-bit product of uint32 ``a`` and ``m``."""
    p = a.astype(np.uint64) * m
    return (p >> _SHIFT32).astype(np.uint32), (p & _LOW32).astype(np.uint32)


def philox4x32(counter, key, rounds: int = 10) -> np.ndarray:
    """The Philox-4x32 block function (Salmon et al., Random123) on arrays of blocks.

    ``counter`` has shape (4, ...) and ``key`` shape (2, ...), both uint32 words that
    broadcast against each other; returns the (4, ...) uint32 output words. With the
    default 10 rounds this is the generator behind CUDA torch and A1111's "NV" source.
    """
    c0, c1, c2, c3 = (np.asarray(w, dtype=np.uint32) for w in counter)
    k0, k1 = (np.asarray(w, dtype=np.uint32) for w in key)
    for r in range(rounds):
        if r:  # ufuncs wrap modulo 2**32 silently; numpy scalar arithmetic would warn
            k0, k1 = np.add(k0, _PHILOX_W[0]), np.add(k1, _PHILOX_W[1])
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3))


# A1111 keeps these as one-element float32 arrays; numpy then promotes ``uint32 * f32[1]``
# to float64, so its Box-Muller runs in float64 with float32-rounded constants.
_NV_SCALE = np.float32(2.3283064e-10)  # ~2**-32
_NV_SCALE_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _nv_box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """First Box-Muller output (the ``sin`` one) from two uint32 words, as A1111 does."""
    u = x.astype(np.float64) * np.float64(_NV_SCALE) + np.float64(_NV_SCALE / np.float32(2))
    v = y.astype(np.float64) * np.float64(_NV_SCALE_2PI) + np.float64(
        _NV_SCALE_2PI / np.float32(2)
    )
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class NvGenerator:
    """A1111's "NV" generator: CUDA-style Philox noise computed on the CPU.

    Element ``i`` of a call uses counter ``[offset, 0, i, 0]`` and key = the 64-bit seed
    (low word first); each ``randn`` call then advances ``offset`` by one, as A1111 does,
    so successive calls give the same sequence as A1111's per-image generator.

    The target is A1111's numpy arithmetic, which the tests pin bit for bit (plus the
    Random123 known-answer vectors for the Philox core). Whether that equals CUDA
    ``torch.randn`` bit for bit is not verified here (no GPU); A1111 only claims to
    imitate CUDA, and the example printed in its docstring agrees with its own code to
    about 5e-7 relative, not exactly.
    """

    def __init__(self, seed: int):
        self.seed = _normalize_seed(seed)
        self.offset = 0

    def randn(self, shape) -> np.ndarray:
        """Standard normal float32 array of ``shape``; advances ``offset`` by one."""
        shape = _normalize_shape(shape)
        n = math.prod(shape)
        if n > 1 << 32:
            raise InvalidArgumentError(
                f"the NV generator draws at most 2**32 values per call, got {n}"
            )
        counter = (np.uint32(self.offset & 0xFFFFFFFF), np.uint32(0),
                   np.arange(n, dtype=np.uint32), np.uint32(0))
        key = (np.uint32(self.seed & 0xFFFFFFFF), np.uint32(self.seed >> 32))
        self.offset += 1
        words = philox4x32(counter, key)
        return _nv_box_muller(words[0], words[1]).reshape(shape)


def randn_nv(seed: int, shape) -> np.ndarray:
    """One draw from a fresh A1111 "NV" generator (what A1111 uses for the first noise)."""
    return NvGenerator(seed).randn(shape)


# ---------------------------------------------------------------------------------------
# Factory and variation-seed blending
# ---------------------------------------------------------------------------------------


def make_generator(seed: int, source: str = "cpu", cpu_kernel: str = "avx2"):
    """A generator with ``.randn(shape) -> float32 ndarray`` for the named RNG source.

    ``cpu_kernel`` only matters for ``source="cpu"``; see `CpuGenerator`.
    """
    if source == "cpu":
        return CpuGenerator(seed, cpu_kernel)
    if source == "nv":
        return NvGenerator(seed)
    raise unknown_name("rng source", source, SOURCES)


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), as A1111 blends seeds.

    Mirrors A1111's ``processing.slerp`` so variation seeds ("subseeds") give the same
    noise: vectors are taken along axis 1 (for a (C, H, W) latent, the H axis, which is
    what A1111 does), one angle per remaining position. When the inputs are nearly
    parallel (mean cosine > 0.9995) the angle is unusable and A1111 returns
    ``a * t + b * (1 - t)``; that weighting is kept as is, since it only triggers when
    ``a`` and ``b`` are (nearly) the same noise, where the order does not matter. The
    cosine is clipped to [-1, 1] so rounding cannot produce NaN.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise InvalidArgumentError(
            f"slerp needs two arrays of the same shape with at least 2 axes, "
            f"got {a.shape} and {b.shape}"
        )
    dot = (_unit_along_axis1(a) * _unit_along_axis1(b)).sum(axis=1)
    if dot.mean() > 0.9995:
        return a * t + b * (1 - t)
    omega = np.arccos(np.clip(dot, -1, 1))
    so = np.sin(omega)
    wa = np.expand_dims(np.sin((1.0 - t) * omega) / so, 1)
    wb = np.expand_dims(np.sin(t * omega) / so, 1)
    return wa * a + wb * b


def _unit_along_axis1(x: np.ndarray) -> np.ndarray:
    """``x`` divided by its Euclidean norm along axis 1 (kept for broadcasting)."""
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))
