"""DeepCache at run time: the full UNet every N model calls, the shallow pass in between.

The full graph of a folder exported with `--deepcache` also returns the deep feature (the hidden
state entering the cut's up layer, models/deepcache.py); the shallow graph reuses it, running only
conv_in, the first down stages and the last up layers. One DeepCache object serves one sampling
run (its cache is per call, so a Pipeline stays thread-safe); the first model call is always full.
"""

from __future__ import annotations

from edgesd.errors import InvalidArgumentError
from edgesd.models.contract import DEEP_FEATURES
from edgesd.runtime.validation import check_int

MAX_INTERVAL = 1000


def check_interval(interval, folder) -> int:
    """A validated interval (1 = exact, no caching); >1 needs a folder exported with --deepcache."""
    interval = check_int("deepcache_interval", interval, 1, MAX_INTERVAL)
    if interval > 1 and folder.deepcache is None:
        raise InvalidArgumentError(f"deepcache_interval {interval} needs a model folder exported with --deepcache; "
                                   f"{folder.path.name} was not (re-export it, or use deepcache_interval=1)")
    return interval


class DeepCache:
    """`run(**feeds) -> out_sample`: a full pass (caching the deep feature) on calls 0, N, 2N, ...,
    the shallow pass fed the cached feature on the others."""

    def __init__(self, unet, shallow, interval: int):
        self.unet, self.shallow, self.interval = unet, shallow, interval
        self.calls = 0
        self.features = None

    def run(self, **feeds):
        if self.calls % self.interval == 0:
            out, self.features = self.unet.run([self.unet.output_names[0], DEEP_FEATURES], **feeds)
        else:
            out = self.shallow.run(self.shallow.output_names[:1], **{DEEP_FEATURES: self.features}, **feeds)[0]
        self.calls += 1
        return out
