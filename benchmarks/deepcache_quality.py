"""DeepCache's quality cost on the trained toy model: shape-and-colour accuracy (the toy evaluator's
reading) and PSNR against the exact image, for each cache interval, with the UNet time it took.

    python benchmarks/deepcache_quality.py                       # prints a markdown table
    python benchmarks/deepcache_quality.py --intervals 1 2 3 --samplers "Euler a" --write

All prompt combinations in one batch, fixed seeds, CFG 5, as benchmarks/sampler_quality.py. The
toy model is exported with `--deepcache BRANCH` into the demo cache (EDGESD_CACHE, else ~/.cache/edgesd),
under a name that holds the checkpoint's sha256, so a retrained model is exported afresh.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from edgesd.runtime.cli import cache_dir
from edgesd.runtime.toy_eval import CFG, GRID_SEED, grid_prompts, scores

DOCS = Path(__file__).resolve().parents[1] / "docs"


def export_toy(branch: int) -> Path:
    """The toy model exported with DeepCache's graphs cut at `branch` (re-exported when missing)."""
    from edgesd.exporter.export import export
    from edgesd.exporter.toy.folders import checkpoint_tag, config_dir
    from edgesd.models.toy.artefacts import artefact_path

    folder = cache_dir() / "demo" / f"deepcache-{checkpoint_tag()}-{branch}"
    if not folder.is_dir():
        export(artefact_path("checkpoint"), folder, config=config_dir(), progress=True, deepcache=branch)
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def measure(pipe, sampler: str, steps: int, intervals) -> list:
    """One row per interval: accuracy, PSNR against interval 1, UNet seconds."""
    prompts, truths = grid_prompts()
    rows, exact = [], None
    for interval in intervals:
        result = pipe(prompts, num_inference_steps=steps, guidance_scale=CFG, seed=GRID_SEED, sampler=sampler,
                      output_type="np", deepcache_interval=interval)
        images = np.asarray(result.images)
        exact = images if exact is None else exact
        score = scores(np.round(images * 255).astype(np.uint8), truths)
        rows.append({"sampler": sampler, "steps": steps, "interval": interval, "shape+colour": score["shape+colour"],
                     "psnr": psnr(images, exact), "unet_s": result.timings["unet"]})
        print(f"{sampler:10s} {steps} steps, interval {interval}: {rows[-1]['shape+colour']:.3f}, "
              f"{rows[-1]['psnr']:.1f} dB, UNet {rows[-1]['unet_s']:.1f} s", flush=True)
    return rows


def markdown(rows: list, branch: int) -> str:
    lines = [f"Toy model, DeepCache branch {branch}, {len(grid_prompts()[0])} prompts in one batch, seeds "
             f"{GRID_SEED}.., CFG {CFG:g}, CPU ({time.strftime('%Y-%m-%d')}, `python benchmarks/deepcache_quality.py`):",
             "", "| sampler | steps | interval | shape+colour | PSNR vs exact | UNet s |", "|---|---|---|---|---|---|"]
    for r in rows:
        quality = "exact" if r["interval"] == 1 else f"{r['psnr']:.1f} dB"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['interval']} | {r['shape+colour']:.3f} | {quality} | "
                     f"{r['unet_s']:.1f} |")
    lines += ["", "shape+colour: the fraction of images whose shape and colour the toy evaluator reads as the "
              "prompt's; PSNR: against the interval-1 image of the same prompt and seed; UNet s: the UNet stage's "
              "wall time, one run each (on a shared machine it varies by 2x between identical runs)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samplers", nargs="*", default=["Euler a", "DPM++ 2M"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--intervals", nargs="*", type=int, default=[1, 2, 3, 5])
    ap.add_argument("--branch", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="also write docs/deepcache-quality.md")
    args = ap.parse_args(argv)
    from edgesd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(export_toy(args.branch), provider="cpu")
    rows = [r for sampler in args.samplers for r in measure(pipe, sampler, args.steps, args.intervals)]
    text = markdown(rows, args.branch)
    print(text)
    if args.write:
        (DOCS / "deepcache-quality.md").write_text("# DeepCache on the toy model\n\n" + text)


if __name__ == "__main__":
    main()
