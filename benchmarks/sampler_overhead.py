"""Per-step sampler overhead: the time a sampler spends outside `denoise` (arithmetic,
noise generation), per step, for SD-sized latents.

    python -m benchmarks.sampler_overhead            # or: python benchmarks/sampler_overhead.py
    python benchmarks/sampler_overhead.py --steps 20 --samplers "Euler a" "DPM++ 2M"
    python benchmarks/sampler_overhead.py --rng cpu     # the pipeline's A1111-exact step noise

The denoiser is a constant-time stand-in (it returns a preallocated array); its own time
is measured and subtracted. Target: <= 1 ms per step. By default the ancestral samplers
draw from the schedulers' own seeded streams (what `edgesd.schedulers.sample(seed=...)`
uses); `--rng cpu|nv` feeds them the pipeline's A1111-compatible sources instead (torch's
CPU generator, or A1111's "NV" Philox), bit-exact emulations that cost far more.
`--unet-ms 10 --prefetch` models a GPU UNet: the stand-in sleeps (the host is idle, as
while onnxruntime waits for the GPU) and the pipeline's noise for the next step is drawn
meanwhile, as `Pipeline` does on GPU providers.
"""

import argparse
import time

import numpy as np

from edgesd import schedulers as S


def overhead_ms(sampler, shape, steps, repeats=3, rng=None, unet_ms=0.0, prefetch=False):
    table = S.sigma_table()
    sigmas = S.sigmas_for(sampler, "Automatic", steps, table)
    init, _ = S.latent_scales(sampler, sigmas)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * np.float32(init)
    out = np.zeros(shape, np.float32)
    best = float("inf")
    for _ in range(repeats):
        inside, calls = 0.0, 0

        def denoise(xi, sigma):
            nonlocal inside, calls
            t = time.perf_counter()
            calls += 1
            if unet_ms:
                S.normal.host_idle()  # as the pipeline does before a GPU UNet run
                time.sleep(unet_ms / 1e3)
            r = out
            inside += time.perf_counter() - t
            return r

        seeds = list(range(shape[0]))
        noise = None
        if rng and S.noise_kind(sampler) == "gaussian":
            from edgesd.runtime.seeds import ImageNoise

            noise = ImageNoise(shape[1:], seeds, rng, prefetch=prefetch)
            noise.first()
            noise = noise.next
        t0 = time.perf_counter()
        S.sample(sampler, denoise, x, sigmas, seed=seeds, noise=noise, noise_ahead=prefetch)
        total = time.perf_counter() - t0
        best = min(best, (total - inside) / steps * 1e3)
    return best, calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samplers", nargs="*", default=list(S.SAMPLERS))
    ap.add_argument("--shapes", nargs="*", default=["2,4,64,64", "2,4,128,128"])
    ap.add_argument("--rng", choices=("cpu", "nv"), help="ancestral noise from the pipeline's A1111 source")
    ap.add_argument("--unet-ms", type=float, default=0.0, help="the stand-in UNet sleeps this long (a GPU UNet)")
    ap.add_argument("--prefetch", action="store_true", help="with --rng: draw the next step's noise meanwhile")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    print(f"sampler overhead, ms per step ({args.steps} steps; model calls in brackets)")
    print(f"{'sampler':20s}" + "".join(f"{str(s):>22s}" for s in shapes))
    for name in args.samplers:
        cells = []
        for shape in shapes:
            ms, calls = overhead_ms(name, shape, args.steps, rng=args.rng, unet_ms=args.unet_ms,
                                    prefetch=args.prefetch)
            cells.append(f"{ms:14.2f} ({calls:3d} calls)")
        print(f"{name:20s}" + "".join(f"{c:>22s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
