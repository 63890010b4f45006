"""Try training recipes for the toy model's stages side by side, each judged through the
exported ONNX pipeline on the numbers the quality tests assert.

    python benchmarks/toy_recipes.py --device cuda --jobs 12 --work /tmp/recipes
    python benchmarks/toy_recipes.py --only lora-ref,hyper-ref --quick      # a smoke run on the CPU

Each recipe retrains one stage from the committed checkpoint ("unet": the UNet and text
encoder afresh on the committed VAE's latents; "lora" / "hypernetwork": the adapter on the
committed base), exports it with edgesd's exporter and generates the quality grid on the CPU
provider (Euler a and DPM++ 2M Karras, 20 steps, CFG 5). Training may run on a GPU: the
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
# recipe -> (stage, Plan overrides, module constants of exporter.toy.diffusion)
RECIPES = {
    "unet-ref": ("unet", {}, {}),
    "unet-3000": ("unet", {"unet_steps": 3000}, {}),
    "unet-6000": ("unet", {"unet_steps": 6000}, {}),
    "unet-lr1e-3": ("unet", {"unet_lr": 1e-3}, {}),
    "unet-lr4e-3": ("unet", {"unet_lr": 4e-3}, {}),
    "unet-b16x9000": ("unet", {"unet_batch": 16, "unet_steps": 9000}, {}),
    "unet-nosnr": ("unet", {}, {"MIN_SNR": None}),
    "unet-ema999": ("unet", {"unet_ema": 0.999}, {}),
    "unet-drop5": ("unet", {}, {"DROP_CAPTION": 0.05}),
    "lora-ref": ("lora", {}, {}),
    "lora-unet-only": ("lora", {"lora_text": False}, {}),
    "lora-x2": ("lora", {"lora_steps": 1800}, {}),
    "lora-t600": ("lora", {"lora_max_timestep": 600}, {}),
    "lora-r16-lr3e-3": ("lora", {"lora_rank": 16, "lora_lr": 3e-3}, {}),
    "hyper-ref": ("hypernetwork", {}, {}),
    "hyper-2000": ("hypernetwork", {"hyper_steps": 2000}, {}),
    "hyper-2000-lr1e-2": ("hypernetwork", {"hyper_steps": 2000, "hyper_lr": 1e-2}, {}),
    "hyper-4000-lr1e-2": ("hypernetwork", {"hyper_steps": 4000, "hyper_lr": 1e-2}, {}),
    "hyper-2000-lr1e-2-t1000": ("hypernetwork", {"hyper_steps": 2000, "hyper_lr": 1e-2, "hyper_max_timestep": 1000}, {}),
    "hyper-2000-lr1e-2-141": ("hypernetwork", {"hyper_steps": 2000, "hyper_lr": 1e-2, "hyper_layers": (1, 4, 1)}, {}),
}


def plan_of(overrides: dict, quick: bool):
    from edgesd.exporter.toy.train import QUICK, Plan

    base = QUICK if quick else Plan()
    return replace(base, **{k: (min(v, 3) if quick and k.endswith("_steps") else v) for k, v in overrides.items()
                            if k in asdict(base)})


def run_recipe(name: str, work: Path, device: str, quick: bool, checkpoint: Path) -> dict:
    """Train, export and judge one recipe in this process; returns and writes its result."""
    from edgesd.exporter.toy import diffusion, train
    from edgesd.models.toy.artefacts import ARTEFACTS

    stage, overrides, constants = RECIPES[name]
    plan = plan_of(overrides, quick)
    for key, value in constants.items():
        setattr(diffusion, key, value)
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(checkpoint, folder / ARTEFACTS["checkpoint"])
    scenes, images = pickle.loads(pool_path(work, plan.pool).read_bytes())
    t0 = time.time()
    train.run_stage(stage, folder, work / "config", plan, 0, scenes, images,
                    log=lambda m: print(f"{name}: {m}", flush=True), device=device)
    seconds = time.time() - t0
    adapters = {"lora": {"loras": [f"{folder / ARTEFACTS['lora']}:1.0"]},
                "hypernetwork": {"hypernetworks": [f"{folder / ARTEFACTS['hypernetwork']}:1.0"]}}.get(stage, {})
    result = {"recipe": name, "stage": stage, "overrides": overrides, "constants": constants, "device": device,
              "train_seconds": round(seconds, 1),
              "scores": judge(folder / ARTEFACTS["checkpoint"], folder / "onnx", work / "config", adapters)}
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
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
    lines = ["| recipe | stage | train s | " + " | ".join(f"{s} {c}: shape+colour / stripes / outline"
                                                          for s, c in SAMPLERS) + " |",
             "|---|---|---|" + "---|" * len(SAMPLERS)]
    for r in results:
        cells = [f"{v['shape+colour']:.3f} / {v['stripes']:.2f} / {v['outline']:.2f}" for v in r["scores"].values()]
        lines.append(f"| {r['recipe']} | {r['stage']} | {r['train_seconds']} | " + " | ".join(cells) + " |")
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
