"""Long fuzz run of the targets in fuzz_targets.py (not part of the test suite).

    python tests/fuzz_long.py                     # hypothesis, 20,000 examples per target
    python tests/fuzz_long.py --examples 100000   # longer
    python tests/fuzz_long.py --atheris 60        # also atheris (coverage-guided), 60 s per target

Any exception other than a documented `edgesd.errors` one is a failure, reported with the
input that caused it.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_hypothesis(examples: int, seed: int) -> int:
    """The suite's fuzz tests with a larger, randomised budget."""
    env = dict(os.environ, EDGESD_FUZZ_EXAMPLES=str(examples))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", str(HERE / "test_fuzz.py"),
                            "-p", "no:cacheprovider", f"--hypothesis-seed={seed}"], env=env)


def atheris_target(name: str):
    """A one-argument function of fuzzer bytes for atheris, per target."""
    import atheris

    sys.path.insert(0, str(HERE))
    import fuzz_targets as targets

    scratch = Path(tempfile.mkdtemp(prefix="edgesd-fuzz-"))

    def prompt(data: bytes):
        targets.check_prompt(atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(400))

    def infotext(data: bytes):
        targets.check_infotext(atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(2000))

    def safetensors(data: bytes):
        targets.check_safetensors(data, scratch / "f.safetensors")

    return {"prompt": prompt, "infotext": infotext, "safetensors": safetensors}[name]


def run_atheris(seconds: int) -> int:
    failures = 0
    for name in ("prompt", "infotext", "safetensors"):
        code = subprocess.call([sys.executable, __file__, "--atheris-child", name, f"-max_total_time={seconds}"])
        failures += code != 0
    return failures


def atheris_child(name: str, libfuzzer_args: list) -> None:
    import atheris

    target = atheris_target(name)  # imports the code under test
    atheris.instrument_all()  # coverage feedback from every loaded Python function
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="hypothesis examples per target")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--atheris", type=int, default=0, metavar="SECONDS", help="atheris time per target (0: skip)")
    parser.add_argument("--atheris-child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.atheris_child:
        atheris_child(args.atheris_child, rest)
        return 0
    failures = run_hypothesis(args.examples, args.seed) != 0
    if args.atheris:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install atheris); skipped", file=sys.stderr)
        else:
            failures += run_atheris(args.atheris)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
