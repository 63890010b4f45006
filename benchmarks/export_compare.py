"""Export speed and memory: edgesd with two LoRAs and a hypernetwork fused vs optimum's
plain export of the same full-size SD1.5 model, each in its own process.

    python benchmarks/export_compare.py --optimum-python /path/to/venv-with-optimum/bin/python
    python benchmarks/export_compare.py --cache /tmp/bench --repeats 1

Uses the checkpoint and diffusers folder of benchmarks/compare.py (same cache, built when
missing) and writes two synthetic full-size kohya LoRAs and an A1111 hypernetwork beside
them. Prints wall time, peak RSS (VmHWM of the exporting process) and the ratios; the
targets are edgesd no slower than optimum and peak RSS <= 2x the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args) -> None:
    """Run one export in this process and print its wall time and peak RSS."""
    from run_one import peak_rss_mb

    start = time.perf_counter()
    if args.child == "edgesd":
        from edgesd.runtime.cli import main

        adapters = [a for lora in args.lora for a in ("--lora", lora)]
        adapters += [a for hyper in args.hypernetwork for a in ("--hypernetwork", hyper)]
        code = main(["export", args.model, "-o", args.out, "--overwrite", *adapters])
        if code:
            raise SystemExit(code)
    else:
        from optimum.exporters.onnx import main_export

        main_export(args.model, output=args.out, task="text-to-image")
    print("RESULT " + json.dumps({"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}), flush=True)


def adapters(cache: Path) -> dict:
    """Two kohya LoRAs (one LoCon with conv layers) and an A1111 hypernetwork for the
    full-size model, with weights small enough to keep its activations finite (the test
    suite's synthetic adapters are sized for the tiny model)."""
    from edgesd.exporter.adapters.synth import base_model, write_hypernetwork, write_kohya_lora

    files = {"lora": [cache / "lora-a.safetensors", cache / "lora-b.safetensors"],
             "hypernetwork": [cache / "hypernetwork.pt"]}
    if all(f.exists() for fs in files.values() for f in fs):
        return files
    model = base_model("sd1", "full")
    write_kohya_lora(model, files["lora"][0], seed=10, conv=False, std=0.02)
    write_kohya_lora(model, files["lora"][1], seed=11, conv=True, std=0.02)
    write_hypernetwork(model, files["hypernetwork"][0], seed=12, std=0.01)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="benchmarks/compare.py's model cache (default ~/.cache/edgesd/bench)")
    parser.add_argument("--optimum-python", help="python of an environment with optimum-onnx installed")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=("edgesd", "optimum"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--hypernetwork", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import compare

    bench = argparse.Namespace(cache=args.cache, variants=[], optimum_python=None, tiny=False)  # the full model
    paths = compare.prepare(bench)
    files = adapters(compare.cache_dir(bench))
    checkpoint_mb = paths["checkpoint"].stat().st_size / 2**20
    systems = {"edgesd (2 LoRAs + hypernetwork)": [sys.executable, __file__, "--child", "edgesd", "--model",
                                                   str(paths["checkpoint"])]
               + [a for f in files["lora"] for a in ("--lora", str(f))]
               + [a for f in files["hypernetwork"] for a in ("--hypernetwork", str(f))]}
    if args.optimum_python:
        systems["optimum (plain)"] = [args.optimum_python, __file__, "--child", "optimum", "--model",
                                      str(paths["diffusers"])]
    runs = {name: [] for name in systems}
    for rep in range(args.repeats):
        for name, cmd in (systems.items() if rep % 2 == 0 else reversed(systems.items())):
            with tempfile.TemporaryDirectory(dir=compare.cache_dir(bench)) as tmp:
                result = compare.run_for_result([*cmd, "--out", str(Path(tmp) / "out")], name)
            if result:
                runs[name].append(result)
                print(f"  rep {rep + 1} {name}: {result['wall_s']:.0f} s, {result['peak_rss_mb']:.0f} MB", flush=True)
    ours = next(iter(systems))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items() if rs}
    lines = [f"## Export, full-size SD1.5 (checkpoint {checkpoint_mb:.0f} MB, fp16), {args.repeats} run(s) each", "",
             "| export | wall s | peak RSS MB | RSS / checkpoint | edgesd speed-up |", "|---|---|---|---|---|"]
    for name, m in med.items():
        ratio = f"{m['wall_s'] / med[ours]['wall_s']:.2f}x" if ours in med and name != ours else "—"
        lines.append(f"| {name} | {m['wall_s']:.0f} | {m['peak_rss_mb']:.0f} | "
                     f"{m['peak_rss_mb'] / checkpoint_mb:.2f}x | {ratio} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
