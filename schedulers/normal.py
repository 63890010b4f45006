"""Standard normal numbers fast enough to be drawn at every sampler step.

numpy's `Generator.standard_normal` (ziggurat) costs about 11 ns a number on a small CPU,
0.7 ms for one 4x128x128 latent, which alone is most of a 1 ms step budget. The
Box-Muller transform of 23-bit uniforms (what torch's CUDA `randn` does) runs as a few
vectorised passes over the generator's raw 64-bit output instead, about 2x faster, and
each image's draw can run in a thread of its own (numpy releases the GIL for both).
"""

import os
import threading

import numpy as np

_ONE_BITS = np.uint32(0x3F800000)  # the bits of float32 1.0
_TWO, _MINUS_TWO, _TWO_PI = np.float32(2), np.float32(-2), np.float32(2 * np.pi)
_THREADS = min(os.cpu_count() or 1, 8)
_pool = _worker = None


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


class _Ahead:
    """A result computed ahead of need (see `ahead`)."""

    __slots__ = ("fn", "future")

    def __init__(self, fn):
        self.fn, self.future = fn, None

    def result(self):
        with _lock:
            started = self.future is not None
            if not started:  # the host never went idle: compute it here
                _queued.remove(self)
        return self.future.result() if started else self.fn()


_queued: list = []
_lock = threading.Lock()


def ahead(fn):
    """Queue fn() to be computed ahead of need; returns a handle whose `result()` gives it.

    The work starts on a single shared worker thread at the next `host_idle()`, or inline
    at `result()` if none came first. Starting it earlier would cost the caller: the work is
    many small numpy calls that hold the GIL, and the caller's own numpy calls, which release
    it, would hand it over and then wait for it (measured on a GPU: most of the gain lost)."""
    handle = _Ahead(fn)
    with _lock:
        _queued.append(handle)
    return handle


def host_idle():
    """Start the work queued by `ahead`: call it right before the host blocks without the GIL
    (a GPU session's run), so that the worker has the interpreter to itself meanwhile."""
    global _worker
    with _lock:
        if not _queued:
            return
        if _worker is None:
            from concurrent.futures import ThreadPoolExecutor

            _worker = ThreadPoolExecutor(1, thread_name_prefix="edgesd-ahead")
        for handle in _queued:
            handle.future = _worker.submit(handle.fn)
        _queued.clear()
