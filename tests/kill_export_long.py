"""Kill fresh `edgesd export --overwrite` processes with SIGKILL at many random moments (not part
of the test suite; test_interrupted_export.py is its short form).

    python tests/kill_export_long.py CHECKPOINT --config CONFIG_DIR --kills 100 [--seed 1]

After every kill OUT must be the complete previous export (same files, same bytes) and no
temporary folder but the killed run's may remain; at the end a rerun must succeed.
"""

import argparse
import hashlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--config")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="edgesd-kill-")) / "model"
    command = [sys.executable, "-m", "edgesd.runtime.cli", "export", args.checkpoint, "-o", str(out),
               "--overwrite", "-q"] + (["--config", args.config] if args.config else [])
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    duration, previous = time.perf_counter() - start, snapshot(out)
    rng, last_pid = random.Random(args.seed), None
    for i in range(args.kills):
        moment = rng.uniform(0, duration * 1.1)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(moment)
        process.send_signal(signal.SIGKILL)
        finished = process.wait() == 0
        state = snapshot(out)
        if finished:
            previous = state
        elif state != previous:
            print(f"kill {i} at {moment:.2f}s: {out} is not the previous version", file=sys.stderr)
            return 1
        recent = {str(process.pid), str(last_pid)}
        stale = [p.name for p in out.parent.iterdir() if p.name != "model"
                 and p.name.split(".edgesd-tmp-")[-1].split("-")[0] not in recent]
        if stale:
            print(f"kill {i}: temporary folders of earlier runs were not cleaned up: {stale}", file=sys.stderr)
            return 1
        last_pid = process.pid
        print(f"kill {i + 1}/{args.kills} at {moment:.2f}s of {duration:.2f}s: "
              f"{'finished first' if finished else 'previous version intact'}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "model"]
    print("rerun succeeded" + (f"; leftovers: {leftovers}" if leftovers else ", no leftovers"))
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
