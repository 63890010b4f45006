"""Try training recipes for the toy model's stages side by side, each judged through the
exported ONNX pipeline on the numbers the quality tests assert.

    python benchmarks/toy_recipes.py --device cuda --jobs 12 --work /tmp/recipes
    python benchmarks/toy_recipes.py --only lora-ref,hyper-ref --quick      # a smoke run on the CPU

Each recipe retrains stages in order from the committed checkpoint ("unet": the UNet and
text encoder afresh on the checkpoint's VAE latents; "lora" / "hypernetwork": the adapter on
the base; "vae", "decoder": the autoencoder), exports it with edgesd's exporter and generates
the quality grid on the CPU provider (Euler a and DPM++ 2M Karras, 20 steps, CFG 5), without
adapters when the UNet was retrained, and with each retrained adapter at 1.0. An autoencoder
is also judged by its round trips: how often the evaluator reads a scene's style back after
encoding and decoding it (outlined crosses apart, the hardest). Training may run on a GPU: the
random draws come from the same CPU generators as in `exporter/toy/train.py`, but GPU
arithmetic differs, so a recipe's numbers there estimate, not reproduce, a CPU run. Each
recipe runs in its own process; results land in WORK/<recipe>/result.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

SAMPLERS = (("Euler a", "Automatic"), ("DPM++ 2M", "Karras"))
ADAPTERS = {"lora": "loras", "hypernetwork": "hypernetworks"}


def recipe(stages, plan=None, constants=None, config=None) -> dict:
    """`stages` retrained in order from the starting checkpoint; `plan`: Plan overrides;
    `constants`: {"module.NAME": value} of edgesd.exporter.toy modules; `config`: {component:
    overrides} of the toy architecture config (a new architecture must retrain that component)."""
    return {"stages": tuple(stages.split(",")), "plan": plan or {}, "constants": constants or {},
            "config": config or {}}


OUTLINE_HEAVY = {"data.STYLE_SHARES": (0.4, 0.2, 0.4)}
DEEP_LATENT_VAE = {"vae": {"block_out_channels": [8, 16, 32, 64]}}
RECIPES = {
    "unet-ref": recipe("unet"),
    "unet-3000": recipe("unet", {"unet_steps": 3000}),
    "unet-6000": recipe("unet", {"unet_steps": 6000}),
    "unet-lr1e-3": recipe("unet", {"unet_lr": 1e-3}),
    "unet-lr4e-3": recipe("unet", {"unet_lr": 4e-3}),
    "unet-b16x9000": recipe("unet", {"unet_batch": 16, "unet_steps": 9000}),
    "unet-nosnr": recipe("unet", constants={"diffusion.MIN_SNR": None}),
    "unet-ema999": recipe("unet", {"unet_ema": 0.999}),
    "unet-drop5": recipe("unet", constants={"diffusion.DROP_CAPTION": 0.05}),
    "lora-ref": recipe("lora"),
    "lora-unet-only": recipe("lora", {"lora_text": False}),
    "lora-x2": recipe("lora", {"lora_steps": 1800}),
    "lora-t600": recipe("lora", {"lora_max_timestep": 600}),
    "lora-r16-lr3e-3": recipe("lora", {"lora_rank": 16, "lora_lr": 3e-3}),
    "hyper-ref": recipe("hypernetwork"),
    "hyper-2000": recipe("hypernetwork", {"hyper_steps": 2000}),
    "hyper-2000-lr1e-2": recipe("hypernetwork", {"hyper_steps": 2000, "hyper_lr": 1e-2}),
    "hyper-4000-lr1e-2": recipe("hypernetwork", {"hyper_steps": 4000, "hyper_lr": 1e-2}),
    "hyper-2000-lr1e-2-t1000": recipe("hypernetwork", {"hyper_steps": 2000, "hyper_lr": 1e-2,
                                                       "hyper_max_timestep": 1000}),
    "hyper-2000-lr1e-2-141": recipe("hypernetwork", {"hyper_steps": 2000, "hyper_lr": 1e-2, "hyper_layers": (1, 4, 1)}),
    "hyper-drop10": recipe("hypernetwork", {"hyper_drop_caption": 0.1}),
    "hyper-drop25": recipe("hypernetwork", {"hyper_drop_caption": 0.25}),
    "hyper-drop50": recipe("hypernetwork", {"hyper_drop_caption": 0.5}),
    "hyper-drop10-1200": recipe("hypernetwork", {"hyper_drop_caption": 0.1, "hyper_steps": 1200}),
    "hyper-drop10-t1000": recipe("hypernetwork", {"hyper_drop_caption": 0.1, "hyper_max_timestep": 1000}),
    "hyper-drop10-t800": recipe("hypernetwork", {"hyper_drop_caption": 0.1, "hyper_max_timestep": 800}),
    "hyper-drop10-t400": recipe("hypernetwork", {"hyper_drop_caption": 0.1, "hyper_max_timestep": 400}),
    "hyper-drop10-lr1e-2": recipe("hypernetwork", {"hyper_drop_caption": 0.1, "hyper_lr": 1e-2}),
    "hyper-drop10-w4": recipe("hypernetwork", {"hyper_drop_caption": 0.1, "hyper_outline_width": 4}),
    "hyper-drop25-w4": recipe("hypernetwork", {"hyper_drop_caption": 0.25, "hyper_outline_width": 4}),
    "hyper-w4": recipe("hypernetwork", {"hyper_outline_width": 4}),
    "hyper-drop10-141": recipe("hypernetwork", {"hyper_drop_caption": 0.1, "hyper_layers": (1, 4, 1)}),
    # the autoencoder (VAE stage, then the decoder stage), judged by its round trips
    "vae-ref": recipe("vae,decoder"),
    "vae-outline-heavy": recipe("vae,decoder", constants=OUTLINE_HEAVY),
    "vae-edge3": recipe("vae,decoder", constants={"vae.EDGE_WEIGHT": 3.0}),
    "vae-10000": recipe("vae,decoder", {"vae_steps": 10000}),
    "vae-crop64": recipe("vae,decoder", {"vae_steps": 2500, "vae_batch": 8}, {"vae.CROP": 64}),
    "vae-deep-latent": recipe("vae,decoder", config=DEEP_LATENT_VAE),
    "vae-wide": recipe("vae,decoder", config={"vae": {"block_out_channels": [16, 32, 64, 64]}}),
    "vae-2-layers": recipe("vae,decoder", config={"vae": {"layers_per_block": 2}}),
    "vae-decoder-3000": recipe("vae,decoder", {"decoder_steps": 3000}),
    "vae-decoder-outline-heavy": recipe("vae,decoder", {"decoder_style_shares": (0.25, 0.25, 0.5)}),
    "vae-decoder-3000-outline-heavy": recipe("vae,decoder", {"decoder_steps": 3000,
                                                             "decoder_style_shares": (0.25, 0.25, 0.5)}),
    # the whole chain up to the hypernetwork, judged on the grid (base and hypernetwork)
    "chain-ref": recipe("vae,unet,decoder,hypernetwork"),
    "chain-outline-heavy": recipe("vae,unet,decoder,hypernetwork", constants=OUTLINE_HEAVY),
    "chain-deep-latent": recipe("vae,unet,decoder,hypernetwork", config=DEEP_LATENT_VAE),
    "chain-deep-outline-heavy": recipe("vae,unet,decoder,hypernetwork", constants=OUTLINE_HEAVY,
                                       config=DEEP_LATENT_VAE),
}


def plan_of(overrides: dict, quick: bool):
    from edgesd.exporter.toy.train import QUICK, Plan

    base = QUICK if quick else Plan()
    return replace(base, **{k: (min(v, 3) if quick and k.endswith("_steps") else v) for k, v in overrides.items()
                            if k in asdict(base)})


def set_constants(constants: dict) -> None:
    import importlib

    for key, value in constants.items():
        module, name = key.rsplit(".", 1)
        setattr(importlib.import_module(f"edgesd.exporter.toy.{module}"), name, value)


def recipe_config(work: Path, folder: Path, overrides: dict, own: bool) -> Path:
    """The toy config with the recipe's architecture overrides: the shared one if none and not
    `own` (the VAE stage writes its scaling factor into the config)."""
    if not overrides and not own:
        return work / "config"
    config = folder / "config"
    shutil.copytree(work / "config", config)
    for component, changes in overrides.items():
        path = config / component / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes), indent=2) + "\n")
    return config


def run_recipe(name: str, work: Path, device: str, quick: bool, checkpoint: Path) -> dict:
    """Train, export and judge one recipe in this process; returns and writes its result."""
    from edgesd.exporter.toy import train
    from edgesd.models.toy.artefacts import ARTEFACTS

    spec = RECIPES[name]
    plan = plan_of(spec["plan"], quick)
    set_constants(spec["constants"])
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = recipe_config(work, folder, spec["config"], own="vae" in spec["stages"])
    shutil.copy(checkpoint, folder / ARTEFACTS["checkpoint"])
    if "data.STYLE_SHARES" in spec["constants"]:
        from edgesd.exporter.toy.data import scene_pool

        scenes, images = scene_pool(plan.pool, 0)
    else:
        scenes, images = pickle.loads(pool_path(work, plan.pool).read_bytes())
    t0 = time.time()
    for stage in spec["stages"]:
        train.run_stage(stage, folder, config, plan, 0, scenes, images,
                        log=lambda m: print(f"{name}: {m}", flush=True), device=device)
    seconds = time.time() - t0
    scores = {}
    if "decoder" in spec["stages"]:
        scores["round trip"] = round_trip_scores(folder / ARTEFACTS["checkpoint"], config)
    variants = [s for s in spec["stages"] if s in ADAPTERS]
    if "unet" in spec["stages"] or not variants:
        variants.insert(0, "base")
    for variant in variants if set(spec["stages"]) - {"vae", "decoder"} else ():
        adapters = {ADAPTERS[variant]: [f"{folder / ARTEFACTS[variant]}:1.0"]} if variant in ADAPTERS else {}
        scores.update({f"{variant}, {k}": v for k, v in judge(folder / ARTEFACTS["checkpoint"],
                                                              folder / f"onnx-{variant}", config, adapters).items()})
    result = {"recipe": name, **spec, "device": device, "train_seconds": round(seconds, 1), "scores": scores}
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def round_trip_scores(checkpoint: Path, config: Path, n: int = 300) -> dict:
    """The autoencoder's round trips of `n` scenes per style (seed 7, as benchmarks/toy_evaluator.py):
    the fraction read back as the scene's style, and for outlines per shape."""
    import numpy as np

    from toy_evaluator import scenes_of

    from edgesd.exporter.load import load_model
    from edgesd.exporter.toy.vae import round_trip
    from edgesd.models.toy import STYLES, evaluate, render

    vae = load_model(checkpoint, config=config).vae.float().eval()
    result = {}
    for style in STYLES:
        scenes = scenes_of(style, n, 7)
        verdicts = [evaluate(im) for im in round_trip(vae, np.stack([render(s) for s in scenes]))]
        kept = [v.style() == style for v in verdicts]
        result[style] = float(np.mean(kept))
        result[f"{style} shape+colour"] = float(np.mean([(v.shape, v.colour) == (s.shape, s.colour)
                                                         for v, s in zip(verdicts, scenes)]))
        if style == "outlined":
            for shape in sorted({s.shape for s in scenes}):
                result[f"outlined {shape}"] = float(np.mean([k for k, s in zip(kept, scenes) if s.shape == shape]))
    return result


def judge(checkpoint: Path, out: Path, config: Path, adapters: dict) -> dict:
    """{sampler: scores} of the recipe's export on the CPU provider (runtime/toy_eval.py)."""
    from edgesd.exporter.export import export
    from edgesd.runtime.pipeline import Pipeline
    from edgesd.runtime.toy_eval import generate, grid_prompts, scores

    export(checkpoint, out, config=config, overwrite=True, verify=False, progress=False, **adapters)
    pipe = Pipeline.from_pretrained(out, provider="cpu")
    prompts, truths = grid_prompts()
    return {f"{sampler} {schedule}": scores(generate(pipe, prompts, sampler=sampler, steps=20, schedule=schedule),
                                            truths)
            for sampler, schedule in SAMPLERS}


def pool_path(work: Path, size: int) -> Path:
    return work / f"pool-{size}.pickle"


def prepare(work: Path, quick: bool) -> None:
    """The scene pool (as train.py draws it) and the toy config, once for all recipes."""
    from edgesd.exporter.toy.data import scene_pool
    from edgesd.exporter.toy.folders import config_dir
    from edgesd.exporter.toy.train import QUICK, Plan

    work.mkdir(parents=True, exist_ok=True)
    size = (QUICK if quick else Plan()).pool
    if not pool_path(work, size).is_file():
        pool_path(work, size).write_bytes(pickle.dumps(scene_pool(size, 0)))
    shutil.copytree(config_dir(), work / "config", dirs_exist_ok=True)


def table(results: list) -> str:
    """One row per recipe and judged thing: round trips (kept style per style, outlined crosses),
    grid scores (shape+colour / stripes / outline per sampler)."""
    lines = ["| recipe | stages | train s | judged | cells |", "|---|---|---|---|---|"]
    for r in results:
        for key, v in r["scores"].items():
            if key == "round trip":
                cell = " / ".join(f"{k} {v[k]:.2f}" for k in ("filled", "striped", "outlined", "outlined cross"))
            else:
                cell = f"{v['shape+colour']:.3f} / {v['stripes']:.2f} / {v['outline']:.2f}"
            lines.append(f"| {r['recipe']} | {','.join(r['stages'])} | {r['train_seconds']} | {key} | {cell} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/toy-recipes"))
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--jobs", type=int, default=1, help="recipes run at once, each in its own process")
    p.add_argument("--threads", type=int, help="CPU threads per recipe (default: cores / jobs)")
    p.add_argument("--only", help=f"comma-separated recipes (default all: {', '.join(RECIPES)})")
    p.add_argument("--quick", action="store_true", help="a few steps per recipe and a small pool: a smoke run")
    p.add_argument("--checkpoint", type=Path, help="the checkpoint each recipe starts from (default: the committed one)")
    p.add_argument("--recipe", help=argparse.SUPPRESS)  # the worker's entry
    args = p.parse_args(argv)
    from edgesd.models.toy.artefacts import artefact_path

    checkpoint = (args.checkpoint or artefact_path("checkpoint")).resolve()
    if args.recipe:
        run_recipe(args.recipe, args.work, args.device, args.quick, checkpoint)
        return
    names = args.only.split(",") if args.only else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe {', '.join(unknown)}; valid: {', '.join(RECIPES)}")
    prepare(args.work, args.quick)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    def worker(name):
        cmd = [sys.executable, __file__, "--recipe", name, "--work", str(args.work), "--device", args.device,
               "--checkpoint", str(checkpoint)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        with open(args.work / f"{name}.log", "w") as log:
            code = subprocess.run(cmd + (["--quick"] if args.quick else []), stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
        path = args.work / name / "result.json"
        print(f"{name}: exit {code}", flush=True)
        return json.loads(path.read_text()) if code == 0 and path.is_file() else None

    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(worker, names) if r]
    text = table(results)
    (args.work / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
