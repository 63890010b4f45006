"""Standard normal numbers fast enough to be drawn at every sampler step.

numpy's `Generator.standard_normal` (ziggurat) costs about 11 ns a number on a small CPU,
0.7 ms for one 4x128x128 latent, which alone is most of a 1 ms step budget. The
Box-Muller transform of 23-bit uniforms (what torch's CUDA `randn` does) runs as a few
vectorised passes over the generator's raw 64-bit output instead, about 2x faster, and
each image's draw can run in a thread of its own (numpy releases the GIL for both).
"""

import os

import numpy as np

_ONE_BITS = np.uint32(0x3F800000)  # the bits of float32 1.0
_TWO, _MINUS_TWO, _TWO_PI = np.float32(2), np.float32(-2), np.float32(2 * np.pi)
_THREADS = min(os.cpu_count() or 1, 8)
_pool = _ahead = None


def fill_standard_normal(bit_generator, out):
    """Fill the float32 array `out` with N(0, 1) numbers from `bit_generator`: each pair of
    23-bit uniforms (u1, u2) gives sqrt(-2 ln u1) * (cos, sin)(2 pi u2). The uniforms are
    made without an int-to-float conversion: the bits set under a float32 exponent of 0
    give f in [1, 2), so u1 = 2 - f lies in (0, 1] (|z| <= 5.64). Returns `out`."""
    flat = out.reshape(-1)
    n = flat.size
    half = (n + 1) // 2
    words = bit_generator.random_raw(half).view(np.uint32)  # 2 * half 32-bit words
    words >>= 9
    words |= _ONE_BITS
    ones = words.view(np.float32)  # uniform in [1, 2)
    radius, angle = ones[:half], ones[half:]
    np.subtract(_TWO, radius, out=radius)
    np.log(radius, out=radius)
    radius *= _MINUS_TWO
    np.sqrt(radius, out=radius)
    angle *= _TWO_PI  # in [2 pi, 4 pi): one turn further than 2 pi u2, same sine and cosine
    np.multiply(radius[: n - half], np.sin(angle[: n - half]), out=flat[half:])
    np.cos(angle, out=angle)
    np.multiply(radius, angle, out=flat[:half])
    return out


def parallel(fn, count):
    """Run fn(0) ... fn(count - 1) on a shared thread pool (inline for one) and wait."""
    global _pool
    if count <= 1 or _THREADS <= 1:
        for i in range(count):
            fn(i)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor  # not at import: it costs the runtime's start

        _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="edgesd-noise")
    for future in [_pool.submit(fn, i) for i in range(count)]:
        future.result()


def background(fn):
    """Start fn() on a single shared worker thread (work done ahead while the caller waits
    on something else) and return its future."""
    global _ahead
    if _ahead is None:
        from concurrent.futures import ThreadPoolExecutor

        _ahead = ThreadPoolExecutor(1, thread_name_prefix="edgesd-ahead")
    return _ahead.submit(fn)
