"""The GPU checks recorded in docs/gpu-results.md, for a machine with an NVIDIA GPU.

    python benchmarks/gpu_check.py export --work DIR     # full-size synthetic SD1.5 -> fp16 folders (slow; no GPU needed)
    python benchmarks/gpu_check.py checks --work DIR     # everything below, after `export`

Needs onnxruntime-gpu; the torch peer needs torch with CUDA and diffusers. Stages:
- env:      GPU, driver, onnxruntime build and its providers.
- parity:   the embedded toy model exported fp32 and fp16 (UNet and text encoder fp16, VAE
            fp32), with and without `--optimize cuda`: each image on the CUDA EP against the
            fp32 CPU image, at the tolerances in PARITY_TOLERANCE; CUDA graphs against plain runs.
- features: DeepCache and the TAESD decoder (a toy export with both) on the GPU against the CPU.
- tensorrt: engines built once ahead of time, then loaded from the cache (both timed).
- noise:    the same model with samplers that draw noise at each step (A1111's CPU generator,
            Brownian trees), with and without drawing it ahead while the GPU runs the UNet.
- speed:    the full-size synthetic SD1.5 at 512x512, 20 Euler steps, CFG 7: edgesd on the
            CUDA EP (fp16, IOBinding, with and without CUDA graphs) vs diffusers torch fp16 on
            the same GPU, each in its own process; seconds per image and GPU memory.
Each result is printed as a `RESULT {json}` line and collected in DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
TOY_PROMPT = "a red circle and a blue square"
# image difference in [0, 1] pixel units against the fp32 CPU image (the toy model, 20 steps)
PARITY_TOLERANCE = {"fp32": {"max_abs": 2e-2, "mean_abs": 2e-3}, "fp16": {"max_abs": 0.1, "mean_abs": 1e-2}}


def emit(results: list, record: dict) -> None:
    results.append(record)
    print("RESULT " + json.dumps(record), flush=True)


def edgesd_cli(*args) -> list:
    return [sys.executable, "-m", "edgesd.runtime.cli", *map(str, args)]


# -- export (before the checks; CPU only) -----------------------------------------------

TOY_FOLDERS = {"toy-fp32": {}, "toy-fp16": {"precision": "fp16"},
               "toy-fp16-opt": {"precision": "fp16", "optimize": "cuda"},
               "toy-features": {"deepcache": 0, "tiny_vae": "synthetic"},
               "toy-features-opt": {"deepcache": 0, "precision": "fp16", "optimize": "cuda"}}
FULL_FOLDERS = {"sd15-fp16-opt": {"precision": "fp16", "optimize": "cuda"}, "sd15-fp16": {"precision": "fp16"}}


def export_all(work: Path, size: str, folders: list) -> None:
    """The folders the checks use: the toy in fp32 and fp16 (plain and cuda-optimized), and the
    full-size synthetic SD1.5 in fp16 (optimized for CUDA, and plain)."""
    from edgesd.exporter.export import export
    from edgesd.exporter.toy.folders import config_dir
    from edgesd.models.families import CONFIG_ROOT
    from edgesd.models.toy.artefacts import artefact_path

    work.mkdir(parents=True, exist_ok=True)
    toy = artefact_path("checkpoint")
    for name in (n for n in folders if n in TOY_FOLDERS):
        options = dict(TOY_FOLDERS[name])
        if options.get("tiny_vae") == "synthetic":  # random TAESD weights: only CPU/GPU agreement is checked
            from edgesd.exporter.synth import write_synthetic_tiny_vae

            options["tiny_vae"] = write_synthetic_tiny_vae(work / "taesd_decoder.safetensors", seed=0)
        timed_export(work, name, lambda out, o=options: export(toy, out, config=config_dir(), overwrite=True,
                                                               progress=False, **o))
    config = None if size == "full" else CONFIG_ROOT / "sd1-tiny"
    checkpoint = work / f"sd15-{size}.safetensors"
    full = [n for n in folders if n in FULL_FOLDERS]
    if full and not checkpoint.exists():
        subprocess.run(edgesd_cli("synth", "sd1", "--size", size, "-o", checkpoint), check=True)
    for name in full:
        timed_export(work, name, lambda out, o=FULL_FOLDERS[name]: export(checkpoint, out, config=config,
                                                                          overwrite=True, progress=False,
                                                                          verify=False, **o))
    (work / "export.done").write_text("done\n")


def timed_export(work: Path, name: str, run) -> bool:
    start = time.perf_counter()
    try:
        run(work / name)
    except Exception as e:  # recorded, and the checks go on without this folder
        print(f"EXPORT {name} failed: {type(e).__name__}: {e}", flush=True)
        (work / f"{name}.failed").write_text(f"{type(e).__name__}: {e}\n")
        return False
    print(f"EXPORT {name} {time.perf_counter() - start:.1f} s", flush=True)
    (work / f"{name}.seconds").write_text(f"{time.perf_counter() - start:.1f}\n")
    return True


# -- checks -------------------------------------------------------------------------------

def env_facts(results: list) -> None:
    import onnxruntime as ort

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = None
    emit(results, {"stage": "env", "gpu": smi, "onnxruntime": ort.__version__, "device": ort.get_device(),
                   "providers": ort.get_available_providers()})


def image_difference(a, b) -> dict:
    import numpy as np

    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    mse = float(np.mean(d**2))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "psnr_db": 300.0 if mse == 0 else float(10 * np.log10(1.0 / mse))}


def parity(work: Path, results: list, provider: str) -> None:
    from edgesd import Pipeline

    args = dict(prompt=TOY_PROMPT, negative_prompt="", num_inference_steps=20, guidance_scale=7.0, seed=1,
                sampler="DPM++ 2M", schedule="Karras", output_type="np")
    reference = Pipeline.from_pretrained(work / "toy-fp32", provider="cpu")(**args).images
    runs = [("toy-fp32", "fp32", {}), ("toy-fp16", "fp16", {}), ("toy-fp16-opt", "fp16", {}),
            ("toy-fp16", "fp16", {"cuda_graph": True}), ("toy-fp16-opt", "fp16", {"cuda_graph": True})]
    images = {}
    for folder, precision, options in runs:
        label = folder + ("+cuda-graph" if options else "")
        if not (work / folder).is_dir():
            emit(results, {"stage": "parity", "run": label, "skipped": "not exported"})
            continue
        try:
            pipe = Pipeline.from_pretrained(work / folder, provider=provider, **options)
            images[label] = pipe(**args).images
            record = {"stage": "parity", "run": label, "provider": pipe.provider,
                      **image_difference(images[label], reference)}
            limits = PARITY_TOLERANCE[precision]
            record["tolerance"] = limits
            record["pass"] = all(record[k] <= v for k, v in limits.items())
            if options:
                record["vs_without_cuda_graph"] = image_difference(images[label], images.get(folder, reference))
            emit(results, record)
        except Exception as e:
            emit(results, {"stage": "parity", "run": label, "error": f"{type(e).__name__}: {e}"[:600]})


def features(work: Path, results: list, provider: str) -> None:
    """DeepCache (its cached deep features between the two UNet graphs) and the TAESD decoder
    on the GPU provider, with IOBinding (and a CUDA graph where the export allows one), against
    the fp32 export with the same settings on the CPU."""
    from edgesd import Pipeline

    reference_folder = work / "toy-features"
    if not reference_folder.is_dir():
        emit(results, {"stage": "features", "skipped": "toy-features not exported"})
        return
    args = dict(prompt=TOY_PROMPT, negative_prompt="", num_inference_steps=20, guidance_scale=7.0, seed=1,
                sampler="Euler a", output_type="np")
    runs = [("deepcache 3", "toy-features", "fp32", {}, {"deepcache_interval": 3}),
            ("tiny vae", "toy-features", "fp32", {"tiny_vae": True}, {}),
            ("deepcache 3 + tiny vae", "toy-features", "fp32", {"tiny_vae": True}, {"deepcache_interval": 3}),
            ("fp16 --optimize cuda, deepcache 3", "toy-features-opt", "fp16", {}, {"deepcache_interval": 3}),
            ("fp16 --optimize cuda, deepcache 3, cuda graph", "toy-features-opt", "fp16", {"cuda_graph": True},
             {"deepcache_interval": 3})]
    for label, folder, precision, load, call in runs:
        try:
            cpu = Pipeline.from_pretrained(reference_folder, provider="cpu", tiny_vae=load.get("tiny_vae", False))
            gpu = Pipeline.from_pretrained(work / folder, provider=provider, **load)
            reference, image = cpu(**args, **call).images, gpu(**args, **call).images
            record = {"stage": "features", "run": label, "provider": gpu.provider, **image_difference(image, reference)}
            record["pass"] = all(record[k] <= v for k, v in PARITY_TOLERANCE[precision].items())
            emit(results, record)
        except Exception as e:
            emit(results, {"stage": "features", "run": label, "error": f"{type(e).__name__}: {e}"[:600]})


def conformance(work: Path, results: list, provider: str) -> None:
    """`edgesd check` of the toy folders on the GPU provider (golden I/O at the folder's precision)."""
    for name in TOY_FOLDERS:
        if (work / name).is_dir():
            report = work / f"{name}-check.json"
            proc = subprocess.run(edgesd_cli("check", work / name, "--provider", provider, "--json", report),
                                  capture_output=True, text=True, timeout=300)
            emit(results, {"stage": "conformance", "folder": name, "exit": proc.returncode,
                           "summary": proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else
                           proc.stderr[-400:]})


def tensorrt(work: Path, results: list) -> None:
    """Build the toy's engines ahead of time, then time a load that finds them in the cache."""
    cache = work / "engines"
    for attempt in ("build", "cached"):
        start = time.perf_counter()
        proc = subprocess.run(edgesd_cli("build-engines", work / "toy-fp16", "--profile", "64x64", "--batch", "1-2",
                                         "--cache", cache), capture_output=True, text=True, timeout=900)
        emit(results, {"stage": "tensorrt", "attempt": attempt, "seconds": time.perf_counter() - start,
                       "exit": proc.returncode, "output": (proc.stdout + proc.stderr)[-800:]})
        if proc.returncode:
            return


def wait_for_export(work: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    while not (work / "export.done").exists() and time.monotonic() < deadline:
        time.sleep(5)  # the export may still be running in the background


def speed(work: Path, results: list, size: int, steps: int, repeats: int, provider: str, wait: float) -> None:
    wait_for_export(work, wait)
    checkpoint = next(work.glob("sd15-*.safetensors"), None)
    systems = []
    for name in FULL_FOLDERS:
        if (work / name).is_dir():
            systems.append(("edgesd", str(work / name), []))
            if provider == "cuda" and name.endswith("-opt"):  # CUDA graphs need every node on the GPU
                systems += [("edgesd", str(work / name), ["--cuda-graph"]),
                            ("edgesd", str(work / name), ["--no-io-binding"])]
    if checkpoint is not None:
        systems.append(("diffusers", str(checkpoint), []))
    run_systems(results, "speed", systems, size, steps, repeats, provider)


def step_noise(work: Path, results: list, size: int, steps: int, repeats: int, provider: str, wait: float) -> None:
    """A1111's CPU generator costs milliseconds per step on the host; on a GPU it is drawn ahead,
    while the UNet runs. Each noisy sampler with and without that, beside Euler (no step noise)."""
    wait_for_export(work, wait)
    model = str(work / "sd15-fp16-opt")
    if not Path(model).is_dir():
        emit(results, {"stage": "noise", "skipped": "sd15-fp16-opt not exported"})
        return
    graph = ["--cuda-graph"] if provider == "cuda" else []
    systems = [("edgesd", model, [*graph, "--sampler", "Euler"])]
    for sampler in ("Euler a", "DPM++ 2M SDE"):
        systems += [("edgesd", model, [*graph, "--sampler", sampler, *extra]) for extra in ([], ["--no-prefetch"])]
    run_systems(results, "noise", systems, size, steps, repeats, provider)


def run_systems(results: list, stage: str, systems: list, size: int, steps: int, repeats: int, provider: str) -> None:
    """Each (system, model, extra arguments) in its own process, one record each."""
    for system, model, extra in systems:
        cmd = [sys.executable, __file__, "one", system, model, "--size", str(size), "--steps", str(steps),
               "--repeats", str(repeats), "--provider", provider, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ONE ")]
        record = json.loads(lines[-1][4:]) if lines else {"error": (proc.stdout + proc.stderr)[-1500:]}
        emit(results, {"stage": stage, "system": " ".join([system, *extra]), "model": Path(model).name, **record})


def run_one(args) -> dict:
    """One system in this process: a warm-up image, then `repeats` timed ones (median)."""
    import statistics

    if args.system == "edgesd":
        from edgesd import Pipeline

        if args.no_prefetch:  # the host then draws each step's noise while the GPU waits
            Pipeline.host_idle_during_unet = property(lambda self: False)
        start = time.perf_counter()
        pipe = Pipeline.from_pretrained(args.model, provider=args.provider, cuda_graph=args.cuda_graph,
                                        io_binding=False if args.no_io_binding else None)
        load = time.perf_counter() - start
        kwargs = dict(num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size,
                      seed=1, sampler=args.sampler, output_type="np")

        def generate():
            return pipe(PROMPT, **kwargs)
    else:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        config = reference_config(Path(args.model).parent, "sd1-tiny" if "tiny" in Path(args.model).name else "sd1")
        device = "cuda" if args.provider == "cuda" else "cpu"
        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(
            args.model, config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False,
            torch_dtype=torch.float16 if device == "cuda" else torch.float32).to(device)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        load = time.perf_counter() - start
        kwargs = dict(num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size,
                      output_type="np", generator=torch.Generator(device).manual_seed(1))

        def generate():
            with torch.inference_mode():
                out = pipe(PROMPT, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

    first_start = time.perf_counter()
    generate()
    first = time.perf_counter() - first_start
    walls, timings = [], {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = generate()
        walls.append(time.perf_counter() - start)
        timings = getattr(out, "timings", {})
    record = {"load_s": load, "first_image_s": first, "image_s": statistics.median(walls), "runs_s": walls,
              "gpu_memory_mb": gpu_memory_mb()}
    if timings:
        record.update(unet_step_s=timings.get("unet", 0) / args.steps, vae_s=timings.get("vae_decoder"),
                      text_s=timings.get("text_encoder"), provider=pipe.provider, timings=timings)
    return record


def reference_config(work: Path, name: str) -> Path:
    """SD1.5's config folder with tokenizer files, for diffusers' single-file loader (offline)."""
    import shutil

    from edgesd.exporter.tokenizer_files import write_clip_tokenizer
    from edgesd.models.families import CONFIG_ROOT

    folder = work / f"{name}-config"
    if not (folder / "tokenizer").is_dir():
        shutil.copytree(CONFIG_ROOT / name, folder, dirs_exist_ok=True)
        write_clip_tokenizer(folder / "tokenizer")
    return folder


def gpu_memory_mb() -> float | None:
    """This process's GPU memory as the driver reports it (arenas and caches included)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
    except OSError:  # no NVIDIA driver (a dry run)
        return None
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--size", default="full", help="full (the benchmark) or tiny (a dry run)")
    p.add_argument("--folders", default="toy-fp32,toy-fp16,toy-fp16-opt,sd15-fp16-opt",
                   help=f"comma-separated, from {', '.join([*TOY_FOLDERS, *FULL_FOLDERS])}")
    p = sub.add_parser("checks")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--provider", default="cuda", help="cuda (cpu: a dry run of the script)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stages", default="env,parity,conformance,tensorrt,speed,noise")
    p.add_argument("--wait-export", type=float, default=600, help="seconds to wait for a background export")
    p = sub.add_parser("one")
    p.add_argument("system", choices=["edgesd", "diffusers"])
    p.add_argument("model")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--no-io-binding", action="store_true")
    p.add_argument("--sampler", default="Euler", help="edgesd only (diffusers runs Euler)")
    p.add_argument("--no-prefetch", action="store_true", help="edgesd: draw step noise when it is needed")
    p.add_argument("--provider", default="cuda")
    args = parser.parse_args()
    if args.command == "export":
        export_all(args.work, args.size, args.folders.split(","))
        return
    if args.command == "one":
        print("ONE " + json.dumps(run_one(args)), flush=True)
        return
    results = []
    stages = {"env": lambda: env_facts(results), "parity": lambda: parity(args.work, results, args.provider),
              "tensorrt": lambda: tensorrt(args.work, results),
              "conformance": lambda: conformance(args.work, results, args.provider),
              "features": lambda: features(args.work, results, args.provider),
              "speed": lambda: speed(args.work, results, args.size, args.steps, args.repeats, args.provider,
                                     args.wait_export),
              "noise": lambda: step_noise(args.work, results, args.size, args.steps, args.repeats, args.provider,
                                          args.wait_export)}
    for name in args.stages.split(","):
        try:
            stages[name]()
        except Exception:
            emit(results, {"stage": name, "error": traceback.format_exc()[-1500:]})
        (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
