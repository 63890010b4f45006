"""Side-by-side speed and memory: edgesd vs optimum-ORT vs diffusers-torch (vs sd.cpp).

Full-size SD1.5 architecture with seeded random weights (built once and cached), Euler,
CFG 7, batch 1, warm runs; each system runs in its own process, systems alternate, several
repetitions; medians and ratios are printed (and written to docs/ with --write-docs).

    python benchmarks/compare.py --sizes 256 --repeats 3
    python benchmarks/compare.py --optimum-python /path/to/venv-with-optimum/bin/python
    python benchmarks/compare.py --variants int8 low-memory int8+low-memory int8-conv+low-memory deepcache   # opt-in modes
    python benchmarks/compare.py --variants tiny-vae   # TAESD decoding (export --tiny-vae)
    python benchmarks/compare.py --tiny --sizes 64 --repeats 1 --variants deepcache   # plumbing check, seconds

Peers that are not installed are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEEPCACHE_INTERVAL = 3  # the full UNet every 3 steps, DeepCache's branch 0 between (the paper's common setting)
ROOT = HERE.parent


def cache_dir(args) -> Path:
    path = Path(args.cache or Path.home() / ".cache" / "edgesd" / "bench") / ("tiny" if args.tiny else "")
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_size(args) -> str:
    """The synthetic SD1.x architecture benchmarked: full (SD1.5) or tiny (plumbing checks)."""
    return "tiny" if args.tiny else "full"


def prepare(args) -> dict:
    """Checkpoint, edgesd export, diffusers folder and optimum export — each built once."""
    from edgesd.exporter.export import export
    from edgesd.exporter.synth import write_synthetic_checkpoint

    from edgesd.models.families import get_family

    cache, size = cache_dir(args), model_size(args)
    config = get_family("sd1").config_dir(size if args.tiny else None)
    paths = {"checkpoint": cache / "sd15-synthetic.safetensors", "edgesd": cache / "edgesd-onnx",
             "diffusers": cache / "diffusers", "optimum": cache / "optimum-onnx"}
    if not paths["checkpoint"].exists():
        print(f"building the {size}-size synthetic checkpoint ...", flush=True)
        write_synthetic_checkpoint("sd1", size, paths["checkpoint"], seed=0, dtype="fp16")
    if not paths["edgesd"].exists():
        print("exporting with edgesd ...", flush=True)
        export(paths["checkpoint"], paths["edgesd"], config=config, progress=True)
    if not paths["diffusers"].exists():
        print("writing the diffusers folder ...", flush=True)
        write_diffusers_folder(paths["checkpoint"], paths["diffusers"], config)
    for folder, options in VARIANT_EXPORTS.items():
        paths[folder] = cache / folder
        if any(VARIANTS[v][0] == folder for v in args.variants) and not paths[folder].exists():
            if options.get("tiny_vae") == SYNTHETIC_TAESD:
                from edgesd.exporter.synth import write_synthetic_tiny_vae

                options = dict(options, tiny_vae=write_synthetic_tiny_vae(cache / "taesd_decoder.safetensors", seed=0))
            print(f"exporting with edgesd {options} ...", flush=True)
            export(paths["checkpoint"], paths[folder], config=config, progress=True, **options)
    if args.optimum_python and not paths["optimum"].exists():
        print("exporting with optimum ...", flush=True)
        subprocess.run([args.optimum_python, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model",
                        str(paths["diffusers"]), "--task", "text-to-image", str(paths["optimum"])], check=True)
    return paths


def write_diffusers_folder(checkpoint: Path, out: Path, source_config: Path) -> None:
    import tempfile

    from diffusers import StableDiffusionPipeline

    from edgesd.exporter.tokenizer_files import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        shutil.copytree(source_config, config)
        write_clip_tokenizer(config / "tokenizer")
        pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(config), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out / "tokenizer")  # vocab.json + merges.txt: readable by any transformers version


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 GEMM throughput, measured with numpy (the physical limit on CPU)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_gflop(diffusers_dir: Path, size: int) -> dict:
    """GFLOPs of one CFG-batched UNet call (batch 2) and of one VAE decode (batch 1), counted
    by torch's FLOP counter: with the stage times, how close each runs to the matmul peak."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    latent = size // 8
    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet", local_files_only=True).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(2, 4, latent, latent), torch.tensor(500.0), torch.zeros(2, 77, unet.config.cross_attention_dim))
    flops = {"unet": counter.get_total_flops() / 1e9}
    del unet
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae", local_files_only=True).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(torch.zeros(1, 4, latent, latent))
    flops["vae"] = counter.get_total_flops() / 1e9
    return flops


def run_system(system: str, python: str, model: Path, args, size: int, extra=()) -> dict | None:
    runner = "edgesd" if system.startswith("edgesd") else system
    extra = [e.format(cache=cache_dir(args)) for e in extra]
    cmd = [python, str(HERE / "run_one.py"), runner, str(model), "--size", str(size), "--steps", str(args.steps),
           "--cfg", "7", "--threads", str(args.threads), *extra]
    return run_for_result(cmd, system)


def run_for_result(cmd: list, label: str) -> dict | None:
    """Run `cmd` offline in its own process; the JSON of its `RESULT ` line, or None (its error printed)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {label} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", help="where models are built (default ~/.cache/edgesd/bench)")
    parser.add_argument("--optimum-python", help="python of an environment with optimum-onnx installed")
    parser.add_argument("--sdcpp-python", help="python of an environment with stable-diffusion-cpp-python")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                        help="edgesd's opt-in modes to run beside the exact one")
    parser.add_argument("--tiny", action="store_true", help="the tiny synthetic model instead of SD1.5 (checks the "
                        "harness in seconds; its timings mean nothing)")
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()

    paths = prepare(args)
    systems = {"edgesd": (sys.executable, paths["edgesd"], ())}
    for variant in args.variants:
        folder, extra = VARIANTS[variant]
        systems[f"edgesd {variant}"] = (sys.executable, paths[folder], extra)
    if args.optimum_python:
        systems["optimum"] = (args.optimum_python, paths["optimum"], ())
    if not args.skip_diffusers:
        systems["diffusers"] = (sys.executable, paths["diffusers"], ())
    if args.sdcpp_python:
        systems["sdcpp"] = (args.sdcpp_python, paths["checkpoint"], ())
    # This machine's GEMM rate moves between runs (seen: 207 to 319 GFLOP/s within minutes), so
    # it is measured before and after each size and the highest rate is the peak.
    peaks = [matmul_peak_gflops()]
    numpy_s = import_seconds(sys.executable, "import numpy")
    runtime_s = import_seconds(sys.executable, "from edgesd import Pipeline")
    sections = []
    for system, (python, model, extra) in systems.items():
        if "--graph-cache" in extra:  # one untimed run fills the cache: the timed runs all load from it
            run_system(system, python, model, args, min(args.sizes), extra)
    for size in args.sizes:
        runs = {s: [] for s in systems}
        images = {}
        for rep in range(args.repeats):
            order = list(systems) if rep % 2 == 0 else list(reversed(systems))
            for system in order:
                python, model, extra = systems[system]
                if system.startswith("edgesd"):
                    images[system] = cache_dir(args) / f"image-{size}-{system.replace(' ', '-')}.npy"
                    extra = (*extra, "--save", str(images[system]))
                result = run_system(system, python, model, args, size, extra)
                if result:
                    runs[system].append(result)
                    print(f"  {size}px rep {rep + 1} {system}: {result['wall_s']:.2f} s, "
                          f"{result['peak_rss_mb']:.0f} MB", flush=True)
        peaks.append(matmul_peak_gflops())
        sections.append((size, runs, images))
    peak = max(peaks)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}; numpy float32 matmul peak {peak:.0f} GFLOP/s "
             f"(the highest of {len(peaks)} measurements, {min(peaks):.0f}–{peak:.0f})", "",
             f"Import `from edgesd import Pipeline`: {runtime_s:.2f} s, of which numpy {numpy_s:.2f} s "
             "(onnxruntime is imported when the first model loads; median of 5 fresh interpreters)", ""]
    for size, runs, images in sections:
        lines += report(size, runs, peak, model_gflop(paths["diffusers"], size), args)
        lines += quality(images)
    text = "\n".join(lines)
    print(text)
    if args.write_docs and not args.tiny:
        (ROOT / "docs" / "benchmarks.md").write_text("# Benchmarks\n\n" + text + "\n")


# variant -> (the export it runs, run_one.py options); the exports variants need besides the exact one
VARIANTS = {"int8": ("edgesd-int8", ()), "low-memory": ("edgesd", ("--low-memory",)),
            "int8+low-memory": ("edgesd-int8", ("--low-memory",)), "optimize-cpu": ("edgesd-optimize-cpu", ()),
            "int8-conv+low-memory": ("edgesd-int8conv", ("--low-memory",)),
            "tiny-vae": ("edgesd-taesd", ("--tiny-vae",)),  # random TAESD weights: its PSNR means nothing
            "deepcache": ("edgesd-deepcache", ("--deepcache", str(DEEPCACHE_INTERVAL))),
            # one int8 + DeepCache + TAESD export serves the combinations (its UNet without
            # --deepcache is the plain int8 UNet; without --tiny-vae it decodes with the full VAE)
            "int8+deepcache": ("edgesd-fast", ("--deepcache", str(DEEPCACHE_INTERVAL))),
            "int8+tiny-vae": ("edgesd-fast", ("--tiny-vae",)),
            "int8+deepcache+tiny-vae": ("edgesd-fast", ("--tiny-vae", "--deepcache", str(DEEPCACHE_INTERVAL))),
            # the exact folder, its graphs loaded as onnxruntime optimized them for this CPU (filled before the runs)
            "graph-cache": ("edgesd", ("--graph-cache", "{cache}/graphs"))}
SYNTHETIC_TAESD = "synthetic"  # a seeded random TAESD decoder, written into the cache
# the exports the variants need besides the exact one: folder -> export() options
VARIANT_EXPORTS = {"edgesd-int8": {"quantize": "int8"}, "edgesd-int8conv": {"quantize": "int8-conv"},
                   "edgesd-optimize-cpu": {"optimize": "cpu"},
                   "edgesd-taesd": {"tiny_vae": SYNTHETIC_TAESD}, "edgesd-deepcache": {"deepcache": 0},
                   "edgesd-fast": {"quantize": "int8", "tiny_vae": SYNTHETIC_TAESD, "deepcache": 0}}

def import_seconds(python: str, statement: str, repeats: int = 5) -> float:
    """Median wall time of `statement` in a fresh interpreter (the cost a user pays at start)."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return statistics.median(float(subprocess.run([python, "-c", code], capture_output=True, text=True,
                                                  check=True).stdout) for _ in range(repeats))


def quality(images: dict) -> list:
    """PSNR of each edgesd variant's image against the exact fp32 one (same seed and settings)."""
    import numpy as np

    if "edgesd" not in images or len(images) < 2 or not images["edgesd"].exists():
        return []
    exact = np.load(images["edgesd"])
    lines = ["| edgesd variant | PSNR vs exact fp32 |", "|---|---|"]
    for name, path in images.items():
        if name != "edgesd" and path.exists():
            mse = float(np.mean((np.load(path).astype(np.float64) - exact) ** 2))
            lines.append(f"| {name} | {'identical' if mse == 0 else f'{10 * np.log10(1 / mse):.1f} dB'} |")
    return [*lines, ""]


def report(size: int, runs: dict, peak: float, gflop: dict, args) -> list:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
           for s, rs in runs.items() if rs}
    lines = [f"## {size}x{size}, {args.steps} Euler steps, CFG 7, batch 1 ({args.repeats} runs each, medians)", "",
             "| system | wall s | peak RSS MB | edgesd speed-up |", "|---|---|---|---|"]
    ours = med.get("edgesd")
    for system, m in med.items():
        ratio = f"{m['wall_s'] / ours['wall_s']:.2f}x" if ours and system != "edgesd" else "—"
        lines.append(f"| {system} | {m['wall_s']:.2f} | {m['peak_rss_mb']:.0f} | {ratio} |")
    if ours:
        lines += ["", f"edgesd stages: text encoder {ours['text_encoder_s']:.2f} s, UNet {ours['unet_step_s']:.2f} s/step, "
                      f"VAE decode {ours['vae_s']:.2f} s; runtime overhead (outside session.run) "
                      f"{ours['overhead_s'] * 1e3:.0f} ms = {100 * ours['overhead_s'] / ours['wall_s']:.2f}% of wall",
                  *(f"{name}: {gflop[key]:.0f} GFLOP per {what} -> {gflop[key] / ours[stage]:.0f} GFLOP/s "
                    f"= {100 * gflop[key] / ours[stage] / peak:.0f}% of the matmul peak"
                    for name, key, what, stage in (("UNet", "unet", "CFG call", "unet_step_s"),
                                                   ("VAE decode", "vae", "image", "vae_s"))), ""]
    for system, m in med.items():
        if "first_s" in m:
            lines.append(f"{system}: first image after loading {m['first_s'] / m['wall_s']:.2f}x a warm one "
                         f"(load {m['load_s']:.1f} s)")
    lines.append("")
    for system in runs:
        if not runs[system]:
            lines.append(f"{system}: no successful run")
    return lines


if __name__ == "__main__":
    main()
