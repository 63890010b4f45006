"""`edgesd export --overwrite` killed with SIGKILL at 12 moments spread over its lifetime: after
each kill OUT is the complete previous export, temporary folders of killed runs are removed
by the next export, and a final rerun succeeds.

The exports are forked from a process that has imported the exporter once
(tests/export_zygote.py), so each kill costs only the export's own run time; the kill moments
are stratified over the measured duration of one whole export (seeded jitter), with the last
ones past its end. Two lanes (each its own output folder and exporter process) run side by
side, 6 kills each. `python tests/kill_export_long.py` runs the same check with fresh
`edgesd export` processes and as many kills as asked.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, requires_exporter

pytestmark = requires_exporter
KILLS = 12
TMP_MARK = ".edgesd-tmp-"


class Zygote:
    """tests/export_zygote.py as a subprocess: run(args, kill_after) -> (pid, outcome)."""

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1")  # no thread pool spinning against the kills and other work
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("export_zygote.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        assert self.process.stdout.readline().strip() == "ready"

    def run(self, args, kill_after=None):
        self.process.stdin.write(json.dumps([str(a) for a in args]) + "\n")
        self.process.stdin.flush()
        pid = int(self.process.stdout.readline())
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it had already finished
        return pid, self.process.stdout.readline().strip()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}{TMP_MARK}"))


def owner(name: str, out_name: str) -> int:
    return int(name[len(f".{out_name}{TMP_MARK}"):].split("-")[0])


def assert_complete(out: Path) -> None:
    from edgesd.runtime.model_folder import ModelFolder

    ModelFolder.open(out)  # manifest valid, every graph and config present, every hash as recorded


def kill_lane(checkpoint, parent: Path, kills: int, seed: int) -> int:
    """One export lane: a complete export, `kills` SIGKILLed reruns with --overwrite, a final rerun.
    Kill moments are stratified over the measured run time, the last two at and past its end."""
    out = parent / "model"
    args = ["export", checkpoint, "-o", out, "--config", TINY_CONFIG, "--overwrite", "-q", "--no-verify"]
    zygote = Zygote()
    try:
        start = time.perf_counter()
        assert zygote.run(args)[1] == "exit 0"  # the previous version, and the duration to spread kills over
        duration = time.perf_counter() - start
        assert_complete(out)
        previous = snapshot(out)
        rng = random.Random(seed)
        moments = [duration * (i + rng.random()) / (kills - 2) for i in range(kills - 2)]
        moments += [duration * 1.0, duration * 1.1]  # near and past the measured end: the final rename
        killed = []
        while len(killed) < kills:
            moment = moments[len(killed)]
            pid, outcome = zygote.run(args, kill_after=moment)
            if outcome == "exit 0":  # finished before the kill (timing varies): the new version is complete
                assert_complete(out)
                previous = snapshot(out)
                moments[len(killed)] = moment * 0.8
                continue
            assert outcome == f"signal {signal.SIGKILL}", outcome
            assert snapshot(out) == previous, f"killed at {moment:.2f}s of {duration:.2f}s"
            killed.append(pid)
            owners = {owner(n, "model") for n in leftovers(parent, "model")}
            assert owners <= set(killed[-2:]), "temporary folders of earlier killed runs were not cleaned up"
        assert zygote.run(args)[1] == "exit 0"  # a rerun succeeds
    finally:
        zygote.close()
    assert_complete(out)
    assert leftovers(parent, "model") == []
    return len(killed)


def test_sigkill_at_12_moments_keeps_the_previous_version(tiny_checkpoint, tmp_path):
    """Two lanes side by side (one per core), 6 kills each."""
    from concurrent.futures import ThreadPoolExecutor

    lanes = [tmp_path / "a", tmp_path / "b"]
    for lane in lanes:
        lane.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        kills = pool.map(lambda i: kill_lane(tiny_checkpoint, lanes[i], KILLS // 2, seed=20 + i), range(2))
        assert sum(kills) == KILLS


def test_folder_moved_aside_by_a_killed_run_is_restored(tmp_path):
    """Without an atomic swap the old output is renamed aside before the new one moves in; a run
    killed in between leaves no OUT, and the next export puts the old folder back."""
    from edgesd.exporter.export import remove_stale_temporaries

    aside = tmp_path / f".model{TMP_MARK}999999999-old-abcd1234"
    aside.mkdir()
    (aside / "edgesd.json").write_text("{}")
    dead_new = tmp_path / f".model{TMP_MARK}999999999-ef012345"
    dead_new.mkdir()
    remove_stale_temporaries(tmp_path, "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "edgesd.json").read_text() == "{}"


def test_swap_without_atomic_exchange_keeps_a_complete_folder(tmp_path, monkeypatch):
    from edgesd.exporter import export

    out, new = tmp_path / "model", tmp_path / f".model{TMP_MARK}{os.getpid()}-x"
    out.mkdir(), new.mkdir()
    (out / "v").write_text("old"), (new / "v").write_text("new")
    monkeypatch.setattr(export, "exchange_paths", lambda a, b: False)
    export.replace_folder(new, out)
    assert (out / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_atomic_exchange_swaps_two_folders(tmp_path):
    from edgesd.exporter.export import exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    assert exchange_paths(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
