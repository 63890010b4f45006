"""The `edgesd` command line. User mistakes end with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgesd.errors import EdgesdError, InvalidArgumentError, MissingDependencyError

EXPORT_EXTRA = "pip install 'edgesd[export]'"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESD_CACHE") or Path.home() / ".cache" / "edgesd")


def need_exporter():
    """Import the torch side, or say which extra provides it."""
    try:
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
                      verify=not args.no_verify, progress=not args.quiet)
    errors = {k: v.get("verification", {}).get("relative_error") for k, v in manifest["components"].items()}
    print(f"exported {manifest['family']} ({manifest['variant']}, {manifest['prediction_type']}) to {args.output}")
    for name, err in errors.items():
        print(f"  {name:13s} verified: {'skipped' if err is None else f'relative error {err:.1e}'}")


def cmd_synth(args):
    need_exporter()
    from edgesd.exporter.synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(args.family, args.size, args.output, seed=args.seed, dtype=args.dtype)
    print(f"wrote {path}")


def cmd_generate(args):
    from edgesd.runtime.images import save_png
    from edgesd.runtime.pipeline import Pipeline

    width, height = parse_size(args.size) if args.size else (None, None)
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InvalidArgumentError(f"{out}: output must be a .png file")
    if not out.parent.exists():
        raise InvalidArgumentError(f"{out.parent}: output folder does not exist")
    pipe = Pipeline.from_pretrained(args.model, provider=args.provider)
    result = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.cfg, height=height, width=width, seed=args.seed,
                  num_images_per_prompt=args.batch, sampler=args.sampler, schedule=args.schedule)
    for i, (image, info) in enumerate(zip(result.images, result.infotexts)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_png(image, path, info)
        print(f"wrote {path} (seed {result.seeds[i]})")


def cmd_demo(args):
    need_exporter()
    from edgesd.exporter.export import export
    from edgesd.exporter.synth import write_synthetic_checkpoint
    from edgesd.models.manifest import read_manifest
    from edgesd.runtime.images import save_png
    from edgesd.runtime.pipeline import Pipeline

    root = cache_dir() / "demo"
    checkpoint, model = root / "sd1-tiny.safetensors", root / "sd1-tiny-onnx"
    if read_manifest(model) is None if model.is_dir() else True:
        print(f"preparing the demo model in {root} (once)")
        if not checkpoint.is_file():
            write_synthetic_checkpoint("sd1", "tiny", checkpoint, seed=0)
        from edgesd.models.families import get_family

        export(checkpoint, model, config=get_family("sd1").config_dir("tiny"), overwrite=True, progress=True)
    pipe = Pipeline.from_pretrained(model, provider=args.provider)
    result = pipe(args.prompt, num_inference_steps=args.steps, seed=args.seed, sampler=args.sampler)
    path = save_png(result.images[0], Path(args.output), result.infotext)
    print(f"wrote {path.resolve()}")
    print(result.infotext)


def cmd_info(args):
    import json

    from edgesd.runtime.model_folder import ModelFolder

    folder = ModelFolder.open(args.model)
    print(f"{folder.path}: {folder.family.title} ({folder.variant}), {folder.prediction_type}, "
          f"{folder.precision}, default size {folder.sample_size}")
    for spec in folder.specs.values():
        present = "present" if folder.has(spec.name) else "absent"
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.outputs)
        print(f"  {spec.name:13s} {present:8s} {ins} -> {outs}")
    if folder.manifest and args.json:
        print(json.dumps(folder.manifest, indent=2))


def cmd_samplers(args):
    from edgesd.schedulers import SAMPLERS, SCHEDULES

    print("Samplers:")
    for name, text in SAMPLERS.items():
        print(f"  {name:18s} {text}")
    print("Schedule types:")
    for name, text in SCHEDULES.items():
        print(f"  {name:18s} {text}")


def build_parser() -> argparse.ArgumentParser:
    from edgesd import __version__

    parser = argparse.ArgumentParser(prog="edgesd", description="Stable Diffusion on ONNX Runtime.")
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
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="write a synthetic checkpoint with seeded random weights (LDM layout)")
    p.add_argument("family", help="sd1, sd2 or sd2-v")
    p.add_argument("--size", default="tiny", help="tiny (tests) or full (real shapes)")
    p.add_argument("-o", "--output", required=True, help=".safetensors or .ckpt file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", help="fp32 or fp16")
    p.set_defaults(func=cmd_synth)

    def generation_options(p):
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--sampler", default="Euler")
        p.add_argument("--seed", type=int, default=None, help="-1 or absent: random")
        p.add_argument("--provider", default="auto", help="auto, cpu, cuda or tensorrt")

    p = sub.add_parser("generate", help="text-to-image with an exported model folder")
    p.add_argument("model", help="exported model folder")
    p.add_argument("prompt")
    p.add_argument("-n", "--negative", default="", help="negative prompt")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--schedule", default="Automatic", help="schedule type (see `edgesd samplers`)")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="images to generate (seeds seed, seed+1, ...)")
    p.add_argument("-o", "--output", default="edgesd.png", help="PNG to write")
    generation_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="build, export and run the embedded default model")
    p.add_argument("--prompt", default="a red circle on a black background")
    p.add_argument("-o", "--output", default="edgesd-demo.png", help="PNG to write")
    generation_options(p)
    p.set_defaults(func=cmd_demo, seed=1)

    p = sub.add_parser("info", help="describe an exported model folder")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="also print the manifest")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("samplers", help="list samplers and schedule types")
    p.set_defaults(func=cmd_samplers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except EdgesdError as e:
        print(f"edgesd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
