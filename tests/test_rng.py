"""Tests for edgesd.runtime.rng: seeded noise identical to torch's and A1111's.

The CPU source is checked bit for bit against torch itself (the oracle, imported only
here). The NV source cannot be checked against CUDA torch (no GPU in the test
environment); it is checked against the Random123 Philox known-answer vectors, against
outputs of A1111's ``modules/rng_philox.py`` and against the example in its docstring.
"""

import ctypes
import ctypes.util
import math
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest

from edgesd.errors import InvalidArgumentError, UnknownNameError
from edgesd.runtime import rng
from edgesd.runtime.rng import (
    CpuGenerator,
    NvGenerator,
    make_generator,
    philox4x32,
    randn_cpu,
    randn_nv,
    slerp,
)

SEEDS = [0, 1, 42, 2**32 - 1, 2**32 + 5, 2**63 + 7, 2**64 - 1]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def avx2_torch(torch):
    """torch, provided it runs the AVX2 normal fill that ``kernel="avx2"`` mirrors: its AVX2
    and AVX512 builds do (both compile it; checked on CPUs of each kind). Its default build
    and non-x86 CPUs run scalar code, which the default kernel does not claim to reproduce.
    """
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch is not running its AVX2 normal fill on this CPU")
    return torch


def torch_randn(torch, seed, shape, gen=None):
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).numpy()


def assert_bits_equal(ours, theirs):
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


# --- CPU source: bit-exact against torch -----------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_scalar_path_matches_torch(torch, seed):
    """Below 16 elements torch uses its cached double-precision Box-Muller."""
    for n in range(0, 16):
        assert_bits_equal(randn_cpu(seed, (n,)), torch_randn(torch, seed, (n,)))


@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_vector_path_and_tails_match_torch(avx2_torch, seed):
    """16+ elements: blocks of 16, and the redrawn last 16 when the size is not a multiple."""
    for n in range(16, 41):
        assert_bits_equal(randn_cpu(seed, (n,)), torch_randn(avx2_torch, seed, (n,)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 8, 8), (4,), (1, 4, 13, 7)])
def test_cpu_latent_shapes_match_torch(avx2_torch, seed, shape):
    assert_bits_equal(randn_cpu(seed, shape), torch_randn(avx2_torch, seed, shape))


def _sweep_shapes():
    """60 shapes from 1 to 200,000 elements, log-spaced, odd sizes and latent-like layouts mixed."""
    sizes = sorted({int(round(v)) for v in np.geomspace(1, 200_000, 48)})
    shapes = [(n,) for n in sizes]
    shapes += [(1, 4, 100, 125), (2, 4, 50, 50), (1, 4, 128, 97), (3, 4, 33, 31), (1, 4, 223, 224)]
    shapes += [(5, 7, 11), (1, 4, 1, 1), (2, 16), (9, 9, 9), (1, 4, 64, 65), (4, 4, 96, 1),
               (199_999,)]
    return shapes


SWEEP_SEEDS = [0, 2**32 - 1, 2**63 + 7, 2**64 - 1, 7, 99, 12345, 2**40 + 3, 31337, 4294967296,
               2**48 - 5, 1234567890123, 17, 2**33, 555, 2**62, 8675309, 2**31 - 1, 2**31, 1000003]


def test_cpu_shape_and_seed_sweep_matches_torch(avx2_torch):
    """>= 50 shapes (1 to 200,000 elements) x 20 seeds (0, 2**32-1 and 64-bit ones included),
    each shape drawn with a rotating seed so every seed meets small and large shapes."""
    shapes = _sweep_shapes()
    assert len(shapes) >= 50 and len(SWEEP_SEEDS) >= 20
    assert min(int(np.prod(s)) for s in shapes) == 1 and max(int(np.prod(s)) for s in shapes) == 200_000
    for i, shape in enumerate(shapes):
        for seed in (SWEEP_SEEDS[i % len(SWEEP_SEEDS)], SWEEP_SEEDS[(i + 7) % len(SWEEP_SEEDS)]):
            assert_bits_equal(randn_cpu(seed, shape), torch_randn(avx2_torch, seed, shape))


def test_cpu_many_seeds_large_latent_match_torch(avx2_torch):
    """~500k values: a multiply-add fused differently from torch's build shows up here."""
    for seed in range(3, 3000, 211):
        shape = (1, 4, 96, 88)
        assert_bits_equal(randn_cpu(seed, shape), torch_randn(avx2_torch, seed, shape))


@pytest.mark.parametrize("seed", [0, 42, 2**64 - 1])
def test_cpu_successive_calls_match_one_torch_generator(avx2_torch, seed):
    """State (stream position and cached normal) carries over calls exactly as in torch."""
    sizes = [(3,), (1, 4, 8, 8), (5,), (0,), (17,), (1,), (2, 3), (16,), (15,),
             (1, 4, 20, 20), (1,), (7,), (640,), (1,)]
    g = avx2_torch.Generator().manual_seed(seed)
    ours = CpuGenerator(seed)
    for shape in sizes:
        assert_bits_equal(ours.randn(shape), torch_randn(avx2_torch, seed, shape, g))


def test_cpu_manual_seed_restarts_and_drops_cached_normal(torch):
    g = torch.Generator().manual_seed(9)
    ours = CpuGenerator(9)
    torch.randn((3,), generator=g)  # an odd count leaves a cached second normal
    ours.randn((3,))
    g.manual_seed(11)
    ours.manual_seed(11)
    assert_bits_equal(ours.randn((5,)), torch_randn(torch, 11, (5,), g))


@pytest.mark.parametrize("seed", [-1, -(2**63), -12345])
def test_cpu_negative_seeds_wrap_like_torch(avx2_torch, seed):
    shape = (1, 4, 4, 4)
    assert_bits_equal(randn_cpu(seed, shape), torch_randn(avx2_torch, seed, shape))
    assert np.array_equal(randn_cpu(seed, (7,)), randn_cpu(seed + 2**64, (7,)))


def test_cpu_only_low_32_seed_bits_matter():
    """torch's mt19937 keeps seed & 0xffffffff, so these seeds give the same noise."""
    assert np.array_equal(randn_cpu(5, (3, 8)), randn_cpu(2**32 + 5, (3, 8)))


def test_cpu_dtype_is_a_cast_of_the_float32_draw():
    out = randn_cpu(3, (2, 4, 8, 8), dtype=np.float16)
    assert out.dtype == np.float16
    assert np.array_equal(out, randn_cpu(3, (2, 4, 8, 8)).astype(np.float16))


def test_cpu_generic_kernel_is_libm_up_to_the_last_bit():
    """torch's scalar ``normal_fill_16`` (its default build, no AVX2) calls libm's
    logf/cosf/sinf; re-running it with those calls reproduced torch 2.13 started with
    ATEN_CPU_CAPABILITY=default bit for bit (checked once; a torch subprocess is too slow
    for this suite). The generic kernel rounds float64 results instead, which glibc's
    float functions do not always match: about 1.5% of values differ, by at most two
    units in the last place.
    """
    path = ctypes.util.find_library("m")
    if path is None:
        pytest.skip("no C math library to compare with")
    libm = ctypes.CDLL(path)
    funcs = []
    for name in ("logf", "cosf", "sinf"):
        f = getattr(libm, name)
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        funcs.append(f)
    logf, cosf, sinf = funcs
    u = rng._uniform_f32(rng._MT19937(77).draw(2048)).reshape(-1, 16)
    want = np.empty_like(u)
    for row, uniforms in enumerate(u):
        for j in range(8):
            radius = np.sqrt(np.float32(-2) * np.float32(logf(1 - float(uniforms[j]))))
            theta = float(np.float32(2 * math.pi * float(uniforms[j + 8])))
            want[row, j] = radius * np.float32(cosf(theta))
            want[row, j + 8] = radius * np.float32(sinf(theta))
    got = rng._box_muller16_generic(u)
    assert np.all(np.abs(got - want) <= 2 * np.spacing(np.abs(want)))
    assert np.mean(got == want) > 0.95


def test_cpu_timing_is_interactive():
    randn_cpu(0, (1, 4, 64, 64))
    best = min(_elapsed(lambda: randn_cpu(1, (1, 4, 64, 64))) for _ in range(3))
    assert best < 0.1  # about 5 ms on a laptop core


def _elapsed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_normal_statistics():
    for source in ("cpu", "nv"):
        x = make_generator(123, source).randn((100_000,)).astype(np.float64)
        assert abs(x.mean()) < 0.015 and abs(x.std() - 1) < 0.015
        assert abs(np.mean(np.abs(x) < 1) - 0.6827) < 0.01


# --- emulated float32 arithmetic -------------------------------------------------------


def _round_to_f32(q: Fraction) -> float:
    """Exact round-half-even of a rational to float32 (normal range only)."""
    if q == 0:
        return 0.0
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    scaled = q / Fraction(2) ** (e - 23)  # in [2**23, 2**24)
    m, rem = divmod(scaled.numerator, scaled.denominator)
    twice = 2 * rem
    if twice > scaled.denominator or (twice == scaled.denominator and m % 2):
        m += 1
    return sign * float(Fraction(m) * Fraction(2) ** (e - 23))


def test_fma32_avoids_double_rounding():
    """exact = midpoint - 2**-62: float64 rounds onto the midpoint, then ties-to-even
    would round up; a real fused multiply-add rounds down."""
    a = np.float32(1 + 2.0**-23)
    b = np.float32(2.0**-16 * (1 - 2.0**-23))
    c = np.float32(2.0**8 + 2.0**-15)
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) != c  # the trap
    assert rng._fma32(a, b, c) == c


def _fma32_cases():
    """Random triples of mixed magnitudes, exact cancellations, and products that put the
    float64 sum on (or within 2**-46 relative of) a float32 halfway point."""
    r = np.random.default_rng(5)
    n = 2000
    a = (r.standard_normal(n) * 2.0 ** r.integers(-20, 20, n)).astype(np.float32)
    b = (r.standard_normal(n) * 2.0 ** r.integers(-20, 20, n)).astype(np.float32)
    c = (r.standard_normal(n) * 2.0 ** r.integers(-40, 40, n)).astype(np.float32)
    c[:300] = -(a[:300].astype(np.float64) * b[:300]).astype(np.float32)
    k, j = np.meshgrid(np.arange(-3, 4), np.arange(-3, 4))
    k, j = np.tile(k.ravel(), 40), np.tile(j.ravel(), 40)
    base = (1 + r.integers(0, 2**23, k.size) * 2.0**-23) * 2.0 ** r.integers(-8, 8, k.size)
    base *= r.choice([-1.0, 1.0], k.size)
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(base))) - 24)  # half a float32 ulp of base
    a2 = (1 + k * 2.0**-23).astype(np.float32)
    b2 = (half_ulp * (1 + j * 2.0**-23) * r.choice([-1.0, 1.0], k.size)).astype(np.float32)
    return (np.concatenate([a, a2]), np.concatenate([b, b2]),
            np.concatenate([c, base.astype(np.float32)]))


def test_fma32_is_correctly_rounded():
    a, b, c = _fma32_cases()
    got = rng._fma32(a, b, c)
    want = [_round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
            for x, y, z in zip(a, b, c)]
    assert np.array_equal(got, np.array(want, dtype=np.float32))


# --- Philox / NV source -----------------------------------------------------------------

# Random123 kat_vectors, "philox4x32 10" lines: counter words, key words, expected output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(counter, key)
    assert out.dtype == np.uint32
    assert tuple(int(w) for w in out) == expected


def test_philox_broadcasts_blocks():
    counters = np.array([kat[0] for kat in PHILOX_KAT], dtype=np.uint32).T  # (4, 3)
    keys = np.array([kat[1] for kat in PHILOX_KAT], dtype=np.uint32).T  # (2, 3)
    want = np.array([kat[2] for kat in PHILOX_KAT], dtype=np.uint32).T
    assert np.array_equal(philox4x32(counters, keys), want)


# Float32 bit patterns produced by the algorithm of A1111's modules/rng_philox.py, run
# with numpy 2.4 on x86-64: Generator(0).randn((3, 4)), then .randn((2, 3)) on the same
# generator (offset 1). Its float64 log/sin are rounded to float32, so another libm could
# in principle change a last bit; none of these values sits near such a boundary.
A1111_SEED0_FIRST = [0xBF6CB6AD, 0xBED9C6AF, 0xC02934C5, 0x3E14AB15, 0xBDF788DC, 0xBF1468E7,
                     0xBF1F732F, 0xBEA8225C, 0xBF898A98, 0xBEB9EE06, 0xBFD5E4FB, 0x4010FE09]
A1111_SEED0_SECOND = [0x3E392A6C, 0xBF0D6117, 0x3F6C7F09, 0xBF3C2704, 0x3FB0A3AA, 0x3F5E1D0C]
# Generator(2**32 + 7).randn((6,)): the high word of the seed is part of the key.
A1111_SEED_2P32_7 = [0xBE90C2AC, 0xBF81A392, 0x3C1C1ECB, 0x3EE4E84F, 0x3FCA4931, 0x3F742590]


def _bits(values):
    return np.array(values, dtype=np.uint32).view(np.float32)


def test_nv_matches_a1111_outputs_and_offsets():
    g = NvGenerator(0)
    assert np.array_equal(g.randn((3, 4)), _bits(A1111_SEED0_FIRST).reshape(3, 4))
    assert g.offset == 1
    assert np.array_equal(g.randn((2, 3)), _bits(A1111_SEED0_SECOND).reshape(2, 3))
    assert np.array_equal(randn_nv(2**32 + 7, (6,)), _bits(A1111_SEED_2P32_7))


def test_nv_close_to_the_example_in_a1111_docstring():
    """The docstring's numbers (printed to 8 decimals) agree to ~5e-7 relative."""
    documented = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                  [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                  [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
    np.testing.assert_allclose(randn_nv(0, (3, 4)), documented, rtol=1e-6)


def test_nv_is_deterministic_and_counter_based():
    a = NvGenerator(42)
    first, second = a.randn((4, 8)), a.randn((4, 8))
    assert not np.array_equal(first, second)
    b = NvGenerator(42)
    assert np.array_equal(b.randn((4, 8)), first)
    # element i depends only on (seed, offset, i): a longer draw extends a shorter one
    assert np.array_equal(randn_nv(42, (64,))[:32], first.ravel())
    assert not np.array_equal(randn_nv(5, (8,)), randn_nv(2**32 + 5, (8,)))


# --- factory and argument checking ------------------------------------------------------


def test_make_generator_sources():
    assert isinstance(make_generator(1), CpuGenerator)
    assert isinstance(make_generator(1, "nv"), NvGenerator)
    for source in ("cpu", "nv"):
        out = make_generator(7, source).randn((1, 4, 8, 8))
        assert out.dtype == np.float32 and out.shape == (1, 4, 8, 8)


def test_unknown_names_are_reported_with_choices():
    with pytest.raises(UnknownNameError, match="rng source 'gpu'.*cpu, nv"):
        make_generator(0, "gpu")
    with pytest.raises(UnknownNameError, match="avx2, generic"):
        CpuGenerator(0, kernel="sse")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "3", None, True, np.float32(2)])
def test_invalid_seeds_are_refused(seed):
    for source in ("cpu", "nv"):
        with pytest.raises(InvalidArgumentError, match="seed"):
            make_generator(seed, source)


def test_numpy_integer_seeds_are_accepted():
    assert np.array_equal(randn_cpu(np.int64(-3), (20,)), randn_cpu(-3, (20,)))
    assert np.array_equal(randn_nv(np.uint64(2**64 - 1), (5,)), randn_nv(-1, (5,)))


def test_bad_shapes_are_refused():
    with pytest.raises(InvalidArgumentError, match="shape"):
        randn_cpu(0, (2, -1))
    with pytest.raises(InvalidArgumentError, match="shape"):
        randn_nv(0, (2.5, 3))


def test_imports_and_draws_where_torch_cannot_be_imported():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgesd.runtime.rng import make_generator\n"
            "assert make_generator(1, 'cpu').randn((2, 8)).shape == (2, 8)\n"
            "assert make_generator(1, 'nv').randn((2, 8)).shape == (2, 8)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- slerp ------------------------------------------------------------------------------


def _unit_columns(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_slerp_endpoints():
    a, b = randn_cpu(1, (4, 16, 16)), randn_cpu(2, (4, 16, 16))
    np.testing.assert_allclose(slerp(0.0, a, b), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slerp(1.0, a, b), b, rtol=1e-5, atol=1e-6)


def test_slerp_moves_along_the_great_circle():
    a = _unit_columns(randn_cpu(3, (4, 32, 8)).astype(np.float64))
    b = _unit_columns(randn_cpu(4, (4, 32, 8)).astype(np.float64))
    omega = np.arccos((a * b).sum(axis=1))
    for t in (0.1, 0.5, 0.8):
        out = slerp(t, a, b)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-9)
        np.testing.assert_allclose(np.arccos(np.clip((a * out).sum(axis=1), -1, 1)),
                                   t * omega, rtol=1e-6, atol=1e-9)


def test_slerp_of_identical_noise_is_that_noise():
    a = randn_cpu(5, (4, 8, 8))
    np.testing.assert_allclose(slerp(0.3, a, a), a, rtol=1e-6, atol=1e-7)


def test_slerp_matches_a1111_formula(torch):
    """A1111's processing.slerp, written with torch ops, as the reference."""
    a, b = randn_cpu(6, (4, 24, 16)), randn_cpu(7, (4, 24, 16))
    low, high, val = torch.from_numpy(a), torch.from_numpy(b), 0.35
    dot = ((low / torch.norm(low, dim=1, keepdim=True))
           * (high / torch.norm(high, dim=1, keepdim=True))).sum(1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    want = ((torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low
            + (torch.sin(val * omega) / so).unsqueeze(1) * high)
    np.testing.assert_allclose(slerp(val, a, b), want.numpy(), rtol=1e-5, atol=1e-5)


def test_slerp_refuses_mismatched_inputs():
    with pytest.raises(InvalidArgumentError):
        slerp(0.5, np.ones((4, 8, 8)), np.ones((4, 8, 9)))
    with pytest.raises(InvalidArgumentError):
        slerp(0.5, np.ones(8), np.ones(8))
