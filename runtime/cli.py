"""The `edgesd` command line. User mistakes end with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgesd.errors import EdgesdError, InvalidArgumentError, MissingDependencyError, OutputError

EXPORT_EXTRA = "pip install 'edgesd[export]'"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESD_CACHE") or Path.home() / ".cache" / "edgesd")


def need_exporter():
    """Import the torch side, or say which extra provides it."""
    try:
        import edgesd.exporter  # noqa: F401  (first: it quiets a diffusers import notice)
        import diffusers  # noqa: F401
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"this command needs the exporter ({e.name} is missing): {EXPORT_EXTRA}") from None


def parse_size(text: str) -> tuple:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidArgumentError(f"--size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    return w, h


# -- subcommands --------------------------------------------------------------------------

def cmd_export(args):
    need_exporter()
    from edgesd.exporter.export import export

    manifest = export(args.source, args.output, config=args.config, prediction=args.prediction,
                      overwrite=args.overwrite,
                      verify=not args.no_verify, progress=not args.quiet,
                      loras=args.lora, hypernetworks=args.hypernetwork, lenient=args.lenient, quantize=args.quantize,
                      precision=args.precision, vae_precision=args.vae_precision, optimize=args.optimize,
                      tiny_vae=args.tiny_vae, deepcache=args.deepcache)
    print(f"exported {manifest['family']} ({manifest['variant']}, {manifest['prediction_type']}) to {args.output}")
    for name, entry in manifest["components"].items():
        print(f"  {name:16s} verified: {verification_text(entry)}")
    print_adapters(manifest)


def verification_text(entry: dict) -> str:
    check = entry.get("verification")
    if not check:
        return "skipped"
    if "snr_db" in check:
        return f"{entry.get('precision')} output SNR {check['snr_db']:.1f} dB vs torch"
    precision = "fp32 export" if "graph" in check else entry.get("precision", "fp32")  # graph: CUDA-only ops
    text = f"{precision} relative error {check['relative_error']:.1e}"
    optimization = entry.get("optimization")
    if optimization:
        text += f"; optimized for {optimization['target']}: " + (", ".join(
            f"{n} {op}" for op, n in optimization["fusions"].items()) or "no fusions applied")
    if "graph" in check:
        text += f" (the {entry.get('precision')} optimized graph is not run on the CPU)"
    return text


def print_adapters(manifest: dict) -> None:
    for a in manifest.get("adapters") or []:
        weights = ", ".join(f"{k} {v:g}" for k, v in a.get("multipliers", {}).items())
        print(f"  adapter {a['file']} ({a['kind']}; {weights}): {a['matched_modules']} modules")


def cmd_synth_adapter(args):
    need_exporter()
    from edgesd.exporter.adapters.synth import write

    print(f"wrote {write(args.kind, args.output, family=args.family, size=args.size, seed=args.seed)}")


def cmd_synth(args):
    need_exporter()
    from edgesd.exporter.synth import write_synthetic_checkpoint, write_synthetic_tiny_vae

    if args.family.lower() == "taesd":  # one architecture: --size and --dtype do not apply
        path = write_synthetic_tiny_vae(args.output, seed=args.seed)
    else:
        path = write_synthetic_checkpoint(args.family, args.size, args.output, seed=args.seed, dtype=args.dtype)
    print(f"wrote {path}")


GENERATE_DEFAULTS = {"negative_prompt": "", "num_inference_steps": 20, "guidance_scale": 7.0, "sampler": "Euler",
                     "schedule": "Automatic", "rng": "cpu"}
# CLI option -> Pipeline argument, for the options that `--from-png` values can be overridden by
GENERATE_OPTIONS = {"prompt": "prompt", "negative": "negative_prompt", "steps": "num_inference_steps",
                    "cfg": "guidance_scale", "seed": "seed", "sampler": "sampler", "schedule": "schedule",
                    "rng": "rng", "subseed": "subseed", "subseed_strength": "subseed_strength", "ensd": "ensd",
                    "strength": "strength", "mask_blur": "mask_blur", "inpainting_fill": "inpainting_fill",
                    "clip_skip": "clip_skip", "emphasis": "emphasis", "hr_scale": "hr_scale",
                    "hr_upscaler": "hr_upscaler", "hr_steps": "hr_second_pass_steps",
                    "hr_strength": "hr_denoising_strength", "deepcache": "deepcache_interval"}


def read_png_parameters(path) -> str:
    """The A1111 `parameters` text of a PNG, or a one-line error saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidArgumentError(f"{path}: cannot read the image ({getattr(e, 'strerror', None) or e})") from None
    if not text:
        raise InvalidArgumentError(f"{path}: the image has no 'parameters' text (not saved by A1111 or edgesd)")
    return text


def open_image(path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidArgumentError(f"{path}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from None


def generation_kwargs(args) -> dict:
    """Pipeline arguments: defaults, then the --from-png infotext, then options given explicitly."""
    from edgesd.runtime.infotext import call_arguments, parse_infotext

    kwargs = dict(GENERATE_DEFAULTS)
    if args.from_png:
        kwargs.update(call_arguments(parse_infotext(read_png_parameters(args.from_png))))
    for option, name in GENERATE_OPTIONS.items():
        if getattr(args, option) is not None:
            kwargs[name] = getattr(args, option)
    if args.size:
        kwargs["width"], kwargs["height"] = parse_size(args.size)
    if args.init_image:
        kwargs["init_image"] = open_image(args.init_image, "init image")
    elif "strength" in kwargs:
        raise InvalidArgumentError("this image was made with img2img (it has a Denoising strength): pass --init-image")
    if args.mask:
        kwargs["mask_image"] = open_image(args.mask, "mask")
    if args.vae_tiling:
        kwargs["vae_tiling"] = True
    if args.hr_scale is not None:
        kwargs["enable_hr"] = True
    if "prompt" not in kwargs:
        raise InvalidArgumentError("a prompt is needed (or --from-png IMAGE to take everything from an image)")
    return kwargs


def wants_tiny_vae(args) -> bool:
    """--tiny-vae, or a --from-png image that was decoded with TAESD (its infotext says "VAE: TAESD")."""
    from edgesd.runtime.infotext import parse_infotext

    return bool(args.tiny_vae or args.from_png and parse_infotext(read_png_parameters(args.from_png)).get("VAE") == "TAESD")


def engine_profile(model, kwargs: dict, images: int):
    """The shapes this generation runs (size, hires size, images), so that the TensorRT provider
    picks built engines covering them. Prompt length is known later: one chunk is assumed here."""
    from edgesd.runtime import hires, img2img
    from edgesd.runtime.model_folder import ModelFolder
    from edgesd.runtime.shape_profiles import Range, ShapeProfile

    if "width" in kwargs and "height" in kwargs:
        width, height = kwargs["width"], kwargs["height"]
    elif "init_image" in kwargs:
        width, height = img2img.default_size(kwargs["init_image"])
    else:
        width = height = ModelFolder.open(model).sample_size
    large = hires.target_size(width, height, kwargs.get("hr_scale", 2.0)) if kwargs.get("enable_hr") else (0, 0)
    return ShapeProfile(Range(width, width, max(width, large[0])), Range(height, height, max(height, large[1])),
                        Range(images, images, images))


def cmd_generate(args):
    from edgesd.runtime.images import save_png
    from edgesd.runtime.pipeline import Pipeline

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InvalidArgumentError(f"{out}: output must be a .png file")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output folder does not exist")
    kwargs = generation_kwargs(args)
    profile = engine_profile(args.model, kwargs, args.batch) if args.provider.lower() in ("auto", "tensorrt") else None
    pipe = Pipeline.from_pretrained(args.model, provider=args.provider, low_memory=args.low_memory, profile=profile,
                                    engine_cache=args.engine_cache, allow_rebuild=args.allow_rebuild,
                                    tiny_vae=wants_tiny_vae(args), graph_cache=args.graph_cache, **gpu_options(args))
    for spec in args.embedding or ():
        path, name = (spec, "") if Path(spec).exists() or ":" not in spec else spec.rsplit(":", 1)  # FILE[:WORD]
        pipe.load_embedding(path, token=name or None)
    result = pipe(num_images_per_prompt=args.batch, **kwargs)
    for i, (image, info) in enumerate(zip(result.images, result.infotexts)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_png(image, path, info)
        print(f"wrote {path} (seed {result.seeds[i]})")


DEMO_PROMPTS = ("a red circle on a black background", "a yellow triangle on a gray background",
                "a blue square on a white background", "a green cross on a black background",
                "a purple circle on a white background", "a white triangle on a black background")
DEMO_VARIANTS = ("base", "lora")  # the toy model as trained, and with its stripes LoRA at 1.0


def cmd_demo(args):
    """Export the trained toy model (plain and with its LoRA) once into the cache, draw the
    prompts with both, write one contact sheet (a row per variant)."""
    need_exporter()
    import numpy as np

    from edgesd.exporter.toy.folders import export_variant, is_current
    from edgesd.runtime.images import save_png
    from edgesd.runtime.pipeline import Pipeline
    from edgesd.runtime.toy_eval import CFG, contact_sheet

    root = cache_dir() / "demo"
    if not all(is_current(root / v) for v in DEMO_VARIANTS):
        print(f"preparing the demo model in {root} (once)")
    prompts = list(args.prompt or DEMO_PROMPTS)
    rows, infotext = [], None
    for variant in DEMO_VARIANTS:
        pipe = Pipeline.from_pretrained(export_variant(root, variant, progress=True), provider=args.provider,
                                        **gpu_options(args))
        result = pipe(prompts, num_inference_steps=args.steps, guidance_scale=CFG, seed=args.seed,
                      sampler=args.sampler, output_type="np")
        rows.append(np.round(np.asarray(result.images) * 255).astype(np.uint8))
        infotext = infotext or result.infotext
    path = save_png(contact_sheet(np.concatenate(rows), columns=len(prompts), zoom=4), Path(args.output), infotext)
    print(f"wrote {path.resolve()}")
    print("columns: " + " | ".join(prompts))
    print("rows: the toy model; the same with its stripes LoRA")


def cmd_build_engines(args):
    from edgesd.runtime import engines
    from edgesd.runtime.model_folder import ModelFolder
    from edgesd.runtime.providers import resolve
    from edgesd.runtime.shape_profiles import parse_profile

    profile = parse_profile(args.profile, args.batch, args.chunks)
    resolve("tensorrt")  # before anything else: this onnxruntime may have no TensorRT provider
    folder = ModelFolder.open(args.model)
    print(f"building TensorRT engines for {profile.text()}")
    engines.build_engines(folder, profile, args.cache, device_id=args.device_id, fp16=not args.fp32,
                          progress=not args.quiet)


def cmd_info(args):
    import json

    from edgesd.runtime.model_folder import ModelFolder

    folder = ModelFolder.open(args.model)
    print(f"{folder.path}: {folder.family.title} ({folder.variant}), {folder.prediction_type}, "
          f"{folder.precision}, default size {folder.sample_size}"
          + (f", graphs optimized for {folder.optimization}" if folder.optimization else "")
          + (f", DeepCache branch {folder.deepcache.branch}" if folder.deepcache else ""))
    for spec in folder.specs.values():
        present = "present" if folder.has(spec.name) else "absent"
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.outputs)
        print(f"  {spec.name:16s} {present:8s} {ins} -> {outs}")
    if folder.manifest:
        print_adapters(folder.manifest)
    if folder.manifest and args.json:
        print(json.dumps(folder.manifest, indent=2))


def cmd_check(args):
    from edgesd.runtime.conformance import run_checks
    from edgesd.runtime.conformance.report import check_writable, format_line

    for path in (args.json, args.junit):
        check_writable(path)
    only = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else None
    print(f"edgesd check {args.model}" + (f" against {args.against}" if args.against else ""), flush=True)
    report = run_checks(args.model, provider=args.provider, against=args.against, config=args.config,
                        adapter_dirs=args.adapter_dir or (), only=only,
                        on_result=lambda r: print(format_line(r, 40), flush=True))
    print(report.summary())
    if args.json:
        report.write_json(args.json)
    if args.junit:
        report.write_junit(args.junit)
    return report.exit_code


def cmd_samplers(args):
    from edgesd.schedulers import SAMPLERS, SCHEDULES

    print("Samplers:")
    for name, text in SAMPLERS.items():
        print(f"  {name:18s} {text}")
    print("Schedule types:")
    for name, text in SCHEDULES.items():
        print(f"  {name:18s} {text}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the problem and the valid choices), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from edgesd import __version__
    from edgesd.exporter.precision import PRECISIONS
    from edgesd.models.manifest import OPTIMIZATION_TARGETS

    parser = OneLineParser(prog="edgesd", description="Stable Diffusion on ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"edgesd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a checkpoint to an ONNX model folder (needs the export extra)")
    p.add_argument("source", help="LDM single file (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--config", help="diffusers-format config folder or LDM .yaml, for non-standard architectures")
    p.add_argument("--prediction", choices=["epsilon", "v"],
                   help="the model's prediction type, when neither its configs nor a .yaml beside it say")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check against torch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:UNET_W[:TE_W]]",
                   help="LoRA/LoCon/LoHa/LoKr/PEFT file to fuse (repeatable, applied in order; TE_W defaults to UNET_W)")
    p.add_argument("--hypernetwork", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="A1111 hypernetwork .pt to bake into the UNet graph (repeatable, chained in order)")
    p.add_argument("--lenient", action="store_true", help="adapter keys that match no module warn instead of failing")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="int8: the UNet's attention/linear weights as int8 (ONNX Runtime dynamic quantization); "
                        "int8-conv: its convolutions too")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="fp16: UNet and text encoder in float16, with float32 islands where fp16 overflows")
    p.add_argument("--vae-precision", default=None, choices=list(PRECISIONS),
                   help="the VAE's precision (default fp32: real VAEs overflow fp16)")
    p.add_argument("--deepcache", nargs="?", type=int, const=0, default=None, metavar="BRANCH",
                   help="also export DeepCache's shallow UNet graph, cut at BRANCH (0, the shallowest, if omitted)")
    p.add_argument("--optimize", default=None, choices=list(OPTIMIZATION_TARGETS),
                   help="fuse the graphs with ONNX Runtime's transformer optimizer for this target "
                        "(cuda graphs hold CUDA-only operators)")
    p.add_argument("--tiny-vae", metavar="PATH", help="also export this TAESD decoder (taesd_decoder.safetensors / "
                   ".pth, or a diffusers AutoencoderTiny folder) as vae_decoder_tiny, for generate --tiny-vae")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth-adapter", help="write a synthetic adapter file (seeded random weights, public layout)")
    p.add_argument("kind", help="lora, locon-tucker, loha, lokr, peft or hypernetwork")
    p.add_argument("-o", "--output", required=True, help=".safetensors (.pt for a hypernetwork) file to write")
    p.add_argument("--family", default="sd1")
    p.add_argument("--size", default="tiny", help="base model size the adapter fits: tiny or full")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_adapter)

    p = sub.add_parser("synth", help="write a synthetic checkpoint with seeded random weights (LDM layout)")
    p.add_argument("family", help="sd1, sd2, sd2-v or sdxl; taesd: a TAESD decoder (for export --tiny-vae)")
    p.add_argument("--size", default="tiny", help="tiny (tests) or full (real shapes)")
    p.add_argument("-o", "--output", required=True, help=".safetensors or .ckpt file to write (taesd: "
                   ".safetensors / .pth in the original layout, or a folder: diffusers AutoencoderTiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", help="fp32 or fp16")
    p.set_defaults(func=cmd_synth)

    def generation_options(p):
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--sampler", default="Euler")
        p.add_argument("--seed", type=int, default=None, help="-1 or absent: random")
        p.add_argument("--provider", default="auto", help="auto, cpu, cuda or tensorrt")
        add_gpu_options(p)

    p = sub.add_parser("generate", help="text-to-image, img2img or inpainting with an exported model folder")
    p.add_argument("model", help="exported model folder")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (optional with --from-png)")
    p.add_argument("-n", "--negative", default=None, help="negative prompt")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 7)")
    p.add_argument("--schedule", default=None, help="schedule type (see `edgesd samplers`; default Automatic)")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 8 (default: the model's, or the init image's)")
    p.add_argument("--batch", type=int, default=1, help="images to generate (seeds seed, seed+1, ...)")
    p.add_argument("-o", "--output", default="edgesd.png", help="PNG to write")
    p.add_argument("--rng", default=None, help="noise source: cpu (A1111 'CPU', default) or nv (A1111 'NV')")
    p.add_argument("--subseed", type=int, default=None, help="variation seed")
    p.add_argument("--subseed-strength", type=float, default=None, help="variation strength in [0, 1]")
    p.add_argument("--ensd", type=int, default=None, help="eta noise seed delta (ancestral samplers)")
    p.add_argument("--init-image", help="img2img: the image to start from")
    p.add_argument("--strength", type=float, default=None, help="img2img denoising strength in [0, 1] (0.75)")
    p.add_argument("--mask", help="inpainting: mask image, white = repaint (needs --init-image)")
    p.add_argument("--mask-blur", type=float, default=None, help="mask blur in pixels (4)")
    p.add_argument("--inpainting-fill", default=None, help="original, latent noise or latent nothing")
    p.add_argument("--clip-skip", type=int, default=None, help="A1111's Clip skip: 1 = last CLIP layer (default), "
                   "2 = the one before, ...")
    p.add_argument("--emphasis", default=None, help="(word:1.2) weighting: Original (default), No norm, Ignore, None")
    p.add_argument("--embedding", action="append", metavar="FILE[:WORD]", help="textual inversion file; the prompt "
                   "word WORD (default: the file name) stands for its vectors (repeatable)")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images in overlapping tiles (less memory)")
    p.add_argument("--low-memory", action="store_true",
                   help="load one component at a time and free it after its stage; no arenas; tiled VAE")
    p.add_argument("--graph-cache", nargs="?", const=True, default=False, metavar="DIR",
                   help="CPU: keep the graphs as onnxruntime optimized them for this CPU and load those next time "
                   "(much faster loads; a copy of the weights on disk; default DIR: $EDGESD_CACHE/graphs)")
    p.add_argument("--tiny-vae", action="store_true", help="decode with the TAESD decoder the folder was exported "
                   "with (export --tiny-vae): much faster, lower quality")
    p.add_argument("--hr-scale", type=float, default=None, help="hires fix: upscale factor of a second img2img pass")
    p.add_argument("--hr-upscaler", default=None, help="hires upscaler: Latent (default), Latent (nearest), "
                   "Latent (nearest-exact), Lanczos, Nearest")
    p.add_argument("--hr-steps", type=int, default=None, help="hires second-pass steps (0 = as the first pass)")
    p.add_argument("--hr-strength", type=float, default=None, help="hires denoising strength (0.7)")
    p.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="DeepCache: the full UNet every N steps, its shallow pass between (folders exported with "
                        "--deepcache; 1 = exact, the default)")
    p.add_argument("--from-png", help="take prompt and parameters from a PNG's infotext; options given override")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--sampler", default=None, help="sampler (default Euler)")
    p.add_argument("--seed", type=int, default=None, help="-1 or absent: random")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda or tensorrt")
    p.add_argument("--engine-cache", metavar="DIR", help="TensorRT engine cache (default: $EDGESD_CACHE/engines)")
    p.add_argument("--allow-rebuild", action="store_true",
                   help="TensorRT: build engines for shapes outside the built profile (minutes) instead of failing")
    add_gpu_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("build-engines", help="build TensorRT engines for a shape profile ahead of time")
    p.add_argument("model", help="exported model folder")
    p.add_argument("--profile", required=True, metavar="WxH[-WxH[-WxH]]",
                   help="image size, or min-max (min-opt-max) sizes in pixels")
    p.add_argument("--batch", default="1", metavar="N[-M[-K]]", help="images per call, or a range (default 1)")
    p.add_argument("--chunks", default="1", metavar="N[-M[-K]]",
                   help="prompt length in 75-token chunks, or a range (default 1)")
    p.add_argument("--cache", metavar="DIR", help="engine cache (default: $EDGESD_CACHE/engines)")
    p.add_argument("--device-id", type=int, default=0, help="GPU to build for (default 0)")
    p.add_argument("--fp32", action="store_true", help="fp32 engines (default: fp16 text encoders and UNet)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("demo", help="export the embedded toy model (once) and draw a contact sheet")
    p.add_argument("--prompt", action="append", help="a prompt to draw (repeatable; default: six built-in ones)")
    p.add_argument("-o", "--output", default="edgesd-demo.png", help="PNG to write")
    generation_options(p)
    p.set_defaults(func=cmd_demo, seed=1, sampler="Euler a")

    p = sub.add_parser("info", help="describe an exported model folder")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="also print the manifest")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="prove an exported model folder conforms: structure, contract, golden I/O, "
                                     "end to end (exit 1 if a check fails)")
    p.add_argument("model", help="exported model folder")
    p.add_argument("--against", metavar="SOURCE", help="also compare with the source checkpoint in torch "
                                                      "(needs the export extra)")
    p.add_argument("--config", help="config folder or LDM .yaml for a non-standard --against source")
    p.add_argument("--adapter-dir", action="append", metavar="DIR",
                   help="where the adapters the manifest records are (default: beside SOURCE); repeatable")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda or tensorrt")
    p.add_argument("--json", metavar="REPORT", help="write the results as JSON")
    p.add_argument("--junit", metavar="FILE", help="write the results as JUnit XML (for CI systems)")
    p.add_argument("--only", metavar="GROUPS", help="comma-separated groups: structure, contract, golden, e2e, against")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("samplers", help="list samplers and schedule types")
    p.set_defaults(func=cmd_samplers)
    return parser


def add_gpu_options(p) -> None:
    g = p.add_argument_group("GPU options (cuda and tensorrt providers)")
    g.add_argument("--device-id", type=int, default=0, help="GPU index (0)")
    g.add_argument("--gpu-mem-limit", type=float, default=None, metavar="GIB",
                   help="cap the CUDA memory arena at this many GiB")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the UNet as one CUDA graph (fixed image size and batch; cuda provider)")
    g.add_argument("--no-io-binding", action="store_true",
                   help="copy inputs and outputs at every run instead of keeping them on the GPU")


def gpu_options(args) -> dict:
    limit = None if args.gpu_mem_limit is None else int(args.gpu_mem_limit * 2**30)
    return dict(device_id=args.device_id, gpu_mem_limit=limit, cuda_graph=args.cuda_graph,
                io_binding=False if args.no_io_binding else None)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)  # None, or an exit status of its own (check: 1 when a check fails)
    except EdgesdError as e:
        print(f"edgesd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesd: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
