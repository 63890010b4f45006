"""The fast modes' quality cost on the trained toy model: shape-and-colour accuracy (the toy
evaluator's reading) and PSNR against the exact fp32 image, per mode and sampler.

    python benchmarks/fast_mode_quality.py                    # prints a markdown table
    python benchmarks/fast_mode_quality.py --taesd-width 32   # the run in docs/fast-mode-quality.md

Modes: int8 weights (`--quantize int8`, `int8-conv`), DeepCache (interval 3, branch 0), a TAESD
decoder (`--tiny-vae`), and all three together (the fast mode of docs/benchmarks.md). The toy
model has no published TAESD, so one of TAESD's architecture is distilled from the toy VAE's
decoder first (exporter/toy/taesd.py; width 16: about 6 min on one core, width 32: 16 min).
All prompt combinations in one batch, fixed seeds, CFG 5, 20 steps, as
benchmarks/sampler_quality.py. The TAESD and the exports are cached in the demo cache
(EDGESD_CACHE, else ~/.cache/edgesd) under fast-modes-<checkpoint sha256>-taesd<width>x<steps>/.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from deepcache_quality import psnr
from edgesd.exporter.toy.taesd import WIDTH
from edgesd.runtime.cli import cache_dir
from edgesd.runtime.toy_eval import CFG, GRID_SEED, grid_prompts, scores

INTERVAL = 3
# export name -> export options; each export serves the modes that name it below
EXPORTS = {"fp32": {}, "int8": {"quantize": "int8"}, "int8-conv": {"quantize": "int8-conv"}}
# mode -> (export, DeepCache interval, TAESD)
MODES = {"exact fp32": ("fp32", 1, False), "DeepCache": ("fp32", INTERVAL, False), "TAESD": ("fp32", 1, True),
         "int8": ("int8", 1, False), "int8-conv": ("int8-conv", 1, False),
         "int8 + DeepCache + TAESD": ("int8", INTERVAL, True)}


def toy_taesd(root: Path, steps: int, width: int) -> Path:
    """The toy model's distilled TAESD decoder (trained once, then read from root/taesd)."""
    from edgesd.exporter.toy.data import scene_pool
    from edgesd.exporter.toy.folders import config_dir
    from edgesd.exporter.toy.taesd import distil_taesd
    from edgesd.exporter.toy.train import Plan
    from edgesd.exporter.toy.vae import committed_vae
    from edgesd.models.families import load_configs

    folder = root / "taesd"
    if folder.is_dir():
        return folder
    import torch

    torch.set_num_threads(1)
    _, images = scene_pool(Plan().pool, 0)  # the toy model's own training scenes
    scaling = load_configs(config_dir())["vae"]["scaling_factor"]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # a finished folder or none
        distil_taesd(committed_vae(), scaling, images, Path(tmp) / "taesd", steps=steps, width=width,
                     log=lambda m: print(m, flush=True))
        (Path(tmp) / "taesd").rename(folder)
    return folder


def export_toy(root: Path, name: str, taesd: Path) -> Path:
    """The toy model exported with DeepCache's graphs and the TAESD decoder, plus `name`'s options."""
    from edgesd.exporter.export import export
    from edgesd.exporter.toy.folders import config_dir
    from edgesd.models.toy.artefacts import artefact_path

    folder = root / name
    if not folder.is_dir():  # the exporter writes a folder whole or not at all
        export(artefact_path("checkpoint"), folder, config=config_dir(), progress=False, verify=False, deepcache=0,
               tiny_vae=taesd, **EXPORTS[name])
    return folder


def measure(root: Path, taesd: Path, samplers, steps: int) -> list:
    from edgesd.runtime.pipeline import Pipeline

    prompts, truths = grid_prompts()
    rows, exact = [], {}
    for mode, (name, interval, tiny) in MODES.items():
        pipe = Pipeline.from_pretrained(export_toy(root, name, taesd), provider="cpu", tiny_vae=tiny)
        for sampler in samplers:
            result = pipe(prompts, num_inference_steps=steps, guidance_scale=CFG, seed=GRID_SEED, sampler=sampler,
                          output_type="np", deepcache_interval=interval)
            images = np.asarray(result.images)
            exact.setdefault(sampler, images)
            score = scores(np.round(images * 255).astype(np.uint8), truths)
            rows.append({"mode": mode, "sampler": sampler, "shape+colour": score["shape+colour"],
                         "background": score["background"], "psnr": psnr(images, exact[sampler])})
            print(f"{mode:26s} {sampler:9s} {rows[-1]['shape+colour']:.3f}  {rows[-1]['psnr']:.1f} dB", flush=True)
    return rows


def markdown(rows: list, steps: int, width: int, taesd_steps: int) -> str:
    lines = [f"Toy model, {len(grid_prompts()[0])} prompts in one batch, seeds {GRID_SEED}.., {steps} steps, "
             f"CFG {CFG:g}, CPU provider ({time.strftime('%Y-%m-%d')}, `python benchmarks/fast_mode_quality.py`):",
             "", "| mode | sampler | shape+colour | background | PSNR vs exact fp32 |", "|---|---|---|---|---|"]
    for r in rows:
        quality = "exact" if r["mode"] == "exact fp32" else f"{r['psnr']:.1f} dB"
        lines.append(f"| {r['mode']} | {r['sampler']} | {r['shape+colour']:.3f} | {r['background']:.3f} | {quality} |")
    lines += ["", f"DeepCache: branch 0, the full UNet every {INTERVAL} calls. TAESD: a decoder of TAESD's "
              f"architecture (width {width}, {taesd_steps} steps of 8) distilled from the toy VAE's decoder by "
              "exporter/toy/taesd.py. "
              "shape+colour: the fraction of images whose shape and colour the toy evaluator reads as the prompt's; "
              "PSNR: against the exact fp32 image of the same prompt, seed and sampler."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samplers", nargs="*", default=["Euler a", "DPM++ 2M"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--taesd-steps", type=int, default=3000, help="distillation steps of the toy TAESD")
    ap.add_argument("--taesd-width", type=int, default=WIDTH, help="channels of the toy TAESD (TAESD's own: 64)")
    args = ap.parse_args(argv)
    from edgesd.exporter.toy.folders import checkpoint_tag

    root = cache_dir() / "demo" / f"fast-modes-{checkpoint_tag()}-taesd{args.taesd_width}x{args.taesd_steps}"
    taesd = toy_taesd(root, args.taesd_steps, args.taesd_width)
    text = markdown(measure(root, taesd, args.samplers, args.steps), args.steps, args.taesd_width, args.taesd_steps)
    print(text)


if __name__ == "__main__":
    main()
