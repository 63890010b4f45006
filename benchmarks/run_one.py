"""Run one system once (in its own process) and print a JSON line of measurements.

    python benchmarks/run_one.py edgesd  MODEL_DIR --size 256 --steps 4 --cfg 7 [--low-memory] [--tiny-vae]
        [--deepcache N] [--save X.npy]
    python benchmarks/run_one.py optimum OPTIMUM_DIR ...
    python benchmarks/run_one.py diffusers DIFFUSERS_DIR ...
    python benchmarks/run_one.py sdcpp CHECKPOINT ...

Each run does one warm-up generation, then the timed one. Peak RSS comes from the OS
(getrusage), so it includes everything the process ever held.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

PROMPT = "a photograph of an astronaut riding a horse"


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM starts afresh at exec; getrusage's ru_maxrss
    would inherit the high-water mark of the parent that forked us."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_edgesd(args) -> dict:
    start = time.perf_counter()
    from edgesd import Pipeline
    from edgesd.runtime import model_folder

    import_s = time.perf_counter() - start

    session_time = {"t": 0.0}
    real_run = model_folder.Session.run

    def timed_run(self, *a, **k):
        start = time.perf_counter()
        try:
            return real_run(self, *a, **k)
        finally:
            session_time["t"] += time.perf_counter() - start

    model_folder.Session.run = timed_run
    options = {"low_memory": True} if args.low_memory else {}
    if args.tiny_vae:
        options["tiny_vae"] = True
    if args.graph_cache:
        options["graph_cache"] = args.graph_cache
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, provider="cpu", **options)
    load_s = time.perf_counter() - start
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, height=args.size, width=args.size,
                  seed=1, sampler="Euler", output_type="np", deepcache_interval=args.deepcache)
    start = time.perf_counter()
    pipe(PROMPT, **kwargs)  # the first image after loading, then the timed warm one
    first_s = time.perf_counter() - start
    session_time["t"] = 0.0
    start = time.perf_counter()
    result = pipe(PROMPT, **kwargs)
    wall = time.perf_counter() - start
    if args.save:
        import numpy as np

        np.save(args.save, result.images[0])
    t = result.timings
    return {"wall_s": wall, "text_encoder_s": t["text_encoder"], "unet_s": t["unet"],
            "unet_step_s": t["unet"] / args.steps, "vae_s": t["vae_decoder"],
            "overhead_s": wall - session_time["t"], "import_s": import_s, "load_s": load_s, "first_s": first_s}


def run_optimum(args) -> dict:
    from diffusers import EulerDiscreteScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    start = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(args.model, provider="CPUExecutionProvider")
    load_s = time.perf_counter() - start
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, height=args.size, width=args.size,
                  output_type="np")
    start = time.perf_counter()
    pipe(PROMPT, **kwargs)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    pipe(PROMPT, **kwargs)
    return {"wall_s": time.perf_counter() - start, "load_s": load_s, "first_s": first_s}


def run_diffusers(args) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, height=args.size, width=args.size,
                  output_type="np")
    with torch.inference_mode():
        pipe(PROMPT, **kwargs)
        start = time.perf_counter()
        pipe(PROMPT, **kwargs)
    return {"wall_s": time.perf_counter() - start}


def run_sdcpp(args) -> dict:
    from stable_diffusion_cpp import StableDiffusion

    sd = StableDiffusion(model_path=args.model, wtype="f32", n_threads=args.threads)
    kwargs = dict(prompt=PROMPT, width=args.size, height=args.size, sample_steps=args.steps, cfg_scale=args.cfg,
                  seed=1)
    sd.txt_to_img(**kwargs) if hasattr(sd, "txt_to_img") else sd.generate_image(**kwargs)
    start = time.perf_counter()
    sd.txt_to_img(**kwargs) if hasattr(sd, "txt_to_img") else sd.generate_image(**kwargs)
    return {"wall_s": time.perf_counter() - start}


RUNNERS = {"edgesd": run_edgesd, "optimum": run_optimum, "diffusers": run_diffusers, "sdcpp": run_sdcpp}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(RUNNERS))
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--low-memory", action="store_true", help="edgesd: Pipeline(low_memory=True)")
    parser.add_argument("--deepcache", type=int, default=1, metavar="N",
                        help="edgesd: deepcache_interval (a folder exported with --deepcache)")
    parser.add_argument("--save", help="edgesd: save the image (.npy) for quality comparisons")
    parser.add_argument("--tiny-vae", action="store_true", help="edgesd: decode with the TAESD graph")
    parser.add_argument("--graph-cache", metavar="DIR", help="edgesd: load the graphs optimized for this CPU from DIR")
    args = parser.parse_args()
    result = RUNNERS[args.system](args)
    result.update(system=args.system, size=args.size, steps=args.steps, peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
