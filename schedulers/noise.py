"""Per-step noise for the stochastic samplers.

A noise sampler is called as `noise(sigma, sigma_next)` and returns standard normal noise
shaped like the latent. Each image of a batch draws from its own seeded stream, so a seed
reproduces an image whatever the batch it is in. The step-noise streams are derived from
the seed (never the bare seed) so that they do not repeat the initial latent's noise when
the caller draws that from `numpy.random.default_rng(seed)`.
"""

import inspect
import math
import sys
from collections import OrderedDict

import numpy as np

from edgesd.errors import InvalidArgumentError

from .normal import ahead, fill_standard_normal, parallel

_STEP_STREAM = 0x5EED
_TREE_STREAM = 0xB7EE


def image_seeds(seed, batch):
    """One seed per image: a sequence is used as is, an int n gives n, n+1, ... (A1111)."""
    if seed is None:
        return None
    if np.ndim(seed) == 0:
        return [int(seed) + i for i in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise InvalidArgumentError(f"got {len(seeds)} seeds for a batch of {batch} images")
    return seeds


def _entropy(seed):
    return int(seed) % 2**64


def gaussian_noise(x, seed=None):
    """Independent N(0, 1) draws each call, one seeded stream per image (fresh entropy if
    `seed` is None)."""
    seeds = image_seeds(seed, x.shape[0])
    if seeds is None:
        gens = [np.random.PCG64() for _ in range(x.shape[0])]
    else:
        gens = [np.random.PCG64(np.random.SeedSequence([_entropy(s), _STEP_STREAM])) for s in seeds]

    def draw(sigma=None, sigma_next=None):
        out = np.empty(x.shape, np.float32)
        parallel(lambda i: fill_standard_normal(gens[i], out[i]), len(gens), out[0].size)
        return out.astype(x.dtype, copy=False)

    return draw


class BrownianTree:
    """A seeded Brownian motion W on [t0, t1], sampled lazily at any point.

    W(t1) is drawn first; the value at the split point of an interval is drawn from the
    Brownian bridge between its ends, with a generator keyed by (seed, node), so W(t) is the
    same whatever points were asked for before: the noise of a step does not depend on the
    step count. Intervals are split at their geometric mean when t0 > 0 (the noise levels
    of a schedule are spread geometrically) until they are narrower than `tol` (relative:
    3 %, eight levels over SD's noise range), the tree's resolution. Inside such a leaf, a
    point is bridged between the nearest points already drawn there, so that however
    closely a run's queries follow each other, together they are one Brownian path; only
    their detail finer than the leaf depends on which points came before. (On a Gaussian
    test problem, DPM++ 2M SDE's result converges as the step count grows from 10 to 160
    just as with a 0.1 % tree, at about half the draws a step.) Node values are kept in a
    small LRU cache, since consecutive steps share most of their path; returned arrays may
    be shared with it, so do not modify them.
    """

    def __init__(self, shape, t0, t1, seed, dtype=np.float32, tol=0.03, max_cache_bytes=64 << 20):
        self.shape, self.dtype = tuple(shape), dtype
        self.t0, self.t1 = (float(t0), float(t1)) if t0 <= t1 else (float(t1), float(t0))
        self.entropy = _entropy(seed)
        self.geometric = self.t0 > 0
        self.tol = tol if self.geometric else tol * max(self.t1 - self.t0, 1e-300)
        nbytes = max(int(np.prod(self.shape)) * np.dtype(dtype).itemsize, 1)
        self.cache_size = max(16, min(32, max_cache_bytes // nbytes))
        self.cache = OrderedDict()
        self.spare = []  # float32 arrays evicted from the caches, for new draws to reuse
        self.leaves = OrderedDict()  # leaf node -> {t: W(t)} for the points drawn inside it
        self.points = OrderedDict()  # the last few query results: a step's end is the next one's start
        self.start = np.random.PCG64(np.random.SeedSequence([self.entropy, _TREE_STREAM])).state
        self.bits = np.random.PCG64()
        self.w1 = self._normal(0, 0) * np.sqrt(self.t1 - self.t0)

    def _normal(self, kind, index):
        """The draw of node `index` (`kind` 0: W(t1), 1: a split point, 2: a point in a leaf):
        the seed's stream jumped ahead to a block of 2^40 raw words of its own, about 20x
        cheaper than seeding a generator per node."""
        self.bits.state = self.start
        self.bits.advance((kind << 106) | ((index & (2**64 - 1)) << 40))
        return fill_standard_normal(self.bits, self._buffer()).astype(self.dtype, copy=False)

    def _buffer(self):
        """A float32 array to draw into: one the cache evicted, if nothing else holds it any more.
        Fresh memory costs its first-touch page faults, which at 4x128x128 take longer than the
        draw itself; reusing evicted arrays keeps a run to the cache's few."""
        while self.spare:
            w = self.spare.pop()
            if sys.getrefcount(w) == 2:  # `w` and getrefcount's argument: no caller keeps it
                return w
        return np.empty(self.shape, np.float32)

    @staticmethod
    def _bridge(a, t, b, wa, wb, z):
        """The Brownian bridge from (a, wa) to (b, wb) at t, given standard normal z (reused
        as the output buffer)."""
        slope = np.subtract(wb, wa)
        slope *= (t - a) / (b - a)
        z *= math.sqrt((t - a) * (b - t) / (b - a))
        z += wa
        z += slope
        return z

    def _split(self, a, b):
        return math.sqrt(a * b) if self.geometric else 0.5 * (a + b)

    def _narrow(self, a, b):
        return b < a * (1 + self.tol) if self.geometric else b - a < self.tol

    @staticmethod
    def _remember(store, key, value, size, evict=None):
        """Put `value` in the LRU `store`; the oldest entry beyond `size` goes to `evict`."""
        store[key] = value
        store.move_to_end(key)
        if len(store) > size:
            evicted = store.popitem(last=False)[1]
            if evict is not None:
                evict(evicted)
        return value

    def _retire(self, w):
        """Offer an array no cache keeps any more to later draws (see `_buffer`)."""
        if w.dtype == np.float32:
            self.spare.append(w)

    def _retire_leaf(self, drawn):
        for w in drawn.values():
            self._retire(w)

    def _midpoint(self, node, a, m, b, wa, wb):
        w = self.cache.get(node)
        if w is None:
            return self._remember(self.cache, node, self._bridge(a, m, b, wa, wb, self._normal(1, node)),
                                  self.cache_size, self._retire)
        self.cache.move_to_end(node)
        return w

    def _in_leaf(self, node, a, t, b, wa, wb):
        """W(t) in the leaf [a, b], bridged between its nearest points drawn so far."""
        drawn = self.leaves.get(node)
        if drawn is None:
            drawn = self._remember(self.leaves, node, {}, 8, self._retire_leaf)
        if t in drawn:
            return drawn[t]
        for s, w in drawn.items():
            if a < s < t:
                a, wa = s, w
            elif t < s < b:
                b, wb = s, w
        w = self._bridge(a, t, b, wa, wb, self._normal(2, int(np.float64(t).view(np.uint64))))
        if len(drawn) >= 64:  # queries move along: forget the oldest
            self._retire(drawn.pop(next(iter(drawn))))
        drawn[t] = w
        return w

    def __call__(self, t):
        """W(t), with W(t0) = 0; t is clamped to [t0, t1]."""
        t = min(max(float(t), self.t0), self.t1)
        w = self.points.get(t)
        if w is None:
            w = self._remember(self.points, t, self._value(t), 4)
        return w

    def _value(self, t):
        a, b = self.t0, self.t1
        wa, wb = np.zeros(self.shape, self.dtype), self.w1
        if t == a:
            return wa
        if t == b:
            return wb
        node = 1
        while not self._narrow(a, b):
            m = self._split(a, b)
            wm = self._midpoint(node, a, m, b, wa, wb)
            if t == m:
                return wm
            if t < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        return self._in_leaf(node, a, t, b, wa, wb)


def brownian_noise(x, sigma_min, sigma_max, seed=None, lookahead=None):
    """k-diffusion's BrownianTreeNoiseSampler: (W(sigma_next) - W(sigma)) / sqrt(|step|),
    one tree per image, on [sigma_min, sigma_max].

    `lookahead`, every noise level the sampler will ask for (its sigmas, and substep points
    where it has them), makes each draw queue the walk of the trees to the next level
    (normal.ahead), done on a worker thread once the caller's denoiser reports the host idle
    (normal.host_idle, before a GPU UNet runs); the values are the same, only computed earlier."""
    seeds = image_seeds(seed, x.shape[0])
    if seeds is None:
        seeds = [int(s) for s in np.random.default_rng().integers(0, 2**63 - 1, x.shape[0])]
    trees = [BrownianTree(x.shape[1:], sigma_min, sigma_max, s, x.dtype) for s in seeds]
    levels = None if lookahead is None else sorted({float(s) for s in lookahead if s > 0}, reverse=True)
    pending = None
    walk_work = 5 * int(np.prod(x.shape[1:]))  # a step's walk draws about five nodes per image

    def draw(sigma, sigma_next):
        nonlocal pending
        if pending is not None:  # the trees are not thread-safe: one walk at a time
            pending.result()
            pending = None
        scale = 1.0 / np.sqrt(abs(float(sigma_next) - float(sigma)))
        out = np.empty(x.shape, x.dtype)

        def one(i):  # numpy releases the GIL while it draws and adds: the trees walk in parallel
            np.multiply(np.subtract(trees[i](sigma_next), trees[i](sigma), out=out[i]), scale, out=out[i])

        parallel(one, len(trees), walk_work)
        lower = min(float(sigma), float(sigma_next))
        following = next((s for s in levels if s < lower), None) if levels else None
        if following is not None:
            pending = ahead(lambda: parallel(lambda i: trees[i](following), len(trees), walk_work))
        return out

    return draw


def as_noise_sampler(fn, like):
    """Accept a user noise callable taking either no argument or (sigma, sigma_next)."""
    try:
        params = inspect.signature(fn).parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        takes_two = True
    if takes_two:
        return lambda sigma, sigma_next: np.asarray(fn(sigma, sigma_next), dtype=like.dtype)
    return lambda sigma, sigma_next: np.asarray(fn(), dtype=like.dtype)
