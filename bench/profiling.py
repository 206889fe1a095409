"""Where the sidecar spends its time under load, sampled with py-spy.

py-spy runs on the load core and reads the server's stacks from outside, so
the server runs unmodified. Each profile is kept as py-spy's raw folded stacks
(one line per distinct stack, for flame graph tools) beside a summary of the
functions that hold the most samples.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ingest, load
from bench.processes import LOAD_CORE, ServerProcess, pinned

SAMPLES_PER_S = 250
TOP_FUNCTIONS = 15
# py-spy needs a moment to attach before the load starts.
_ATTACH_S = 0.5
_LINE_NUMBER = re.compile(r":\d+\)$")


def profile_lookups(
    sidecar: ServerProcess, args: argparse.Namespace, results_dir: Path
) -> list[dict[str, Any]]:
    """Profile hot and cold lookups at 32 connections over TCP."""
    profiles = []
    for workload in ("hot", "cold"):

        def run_load(seconds: float, workload: str = workload) -> None:
            load.run_wrk(sidecar.lookup_address, 32, seconds, workload, args.shops)

        profiles.append(
            record(sidecar, f"lookups-{workload}", args.duration, results_dir, run_load)
        )
    return profiles


def profile_ingest(
    sidecar: ServerProcess, args: argparse.Namespace, results_dir: Path, secret: str
) -> list[dict[str, Any]]:
    """Profile signed deliveries from 16 senders."""
    deliveries = ingest.signed_deliveries(
        secret,
        args.shops,
        int(ingest.SIGNED_PER_S * (args.duration + 2)),
        prefix="profile-",
        seed=99,
    )

    def run_load(seconds: float) -> None:
        ingest.run_senders(sidecar.webhook_address, 16, seconds, deliveries)

    return [record(sidecar, "ingest-16", args.duration, results_dir, run_load)]


def record(
    server: ServerProcess,
    name: str,
    duration_s: float,
    results_dir: Path,
    run_load: Callable[[float], None],
) -> dict[str, Any]:
    """Sample `server` for `duration_s` while `run_load` keeps it busy."""
    out = results_dir / "profiles" / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        _py_spy(),
        "record",
        f"--pid={server.pid}",
        f"--duration={max(1, round(duration_s))}",
        f"--rate={SAMPLES_PER_S}",
        "--format=raw",
        f"--output={out}",
        "--nonblocking",
    ]
    with subprocess.Popen(
        pinned(LOAD_CORE, command),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as spy:
        time.sleep(_ATTACH_S)
        run_load(duration_s + 2 * _ATTACH_S)
        _, errors = spy.communicate(timeout=60)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed on {name}:\n{errors}")
    return {"name": name, "raw": str(out), **summarise(out)}


def summarise(raw: Path, top: int = TOP_FUNCTIONS) -> dict[str, Any]:
    """Share of samples at the top of the stack, and in each sidecar function."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            # The sidecar's own functions: the rest are the same everywhere.
            if "(sidecar/" in frame:
                inclusive[frame] += count
        own[frames[-1]] += count

    def shares(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": function, "percent": round(100 * count / total, 1)}
            for function, count in counter.most_common(top)
        ]

    return {"samples": total, "self": shares(own), "inclusive": shares(inclusive)}


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    return found
