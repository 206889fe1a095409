"""Benchmark the sidecar's lookups, ingest, memory and start-up in one run.

Every throughput is reported beside a ceiling measured in the same run on the
same cores (bare aiohttp for lookups, in-process SQLite for ingest). The
machine may be shared, so each measurement is repeated over a few rounds that
alternate between the sidecar and its ceiling, and a ratio is the median of the
ratios within each round: a neighbour's burst of load then lands on both sides
of a ratio rather than on one. Where two servers can be loaded at once (the
sidecar beside bare aiohttp at 32 connections, and beside itself on a larger
table) they are, so that both see the very same machine. The server under
test runs on core 0; every load generator, this driver included, on core 1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ingest, load, profiling, report
from bench.load import LoadResult
from bench.processes import (
    LOAD_CORE,
    SERVER_CORE,
    ServerProcess,
    http_get,
    start_baseline,
    start_sidecar,
)
from bench.shops import PRODUCT, fill_database, shop_id
from sidecar.answers import MAX_ANSWERS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECRET = "whsec_" + base64.b64encode(b"bench-signing-secret-0123456789").decode()
MANY_CONNECTIONS = 32
SENDERS = (1, 16)
WORKLOADS = ("hot", "cold")
# Run against each server before its first measurement, and not reported.
WARM_UP_S = 1.0
# Distinct shops asked for (each twice) before reading resident memory: enough
# to fill the answer cache several times over, so that the figure is the most
# the sidecar will use. (The copy of the table is whole before any figure.)
SWEEP_SHOPS = 8 * MAX_ANSWERS
LARGE_SHOPS = 1_000_000
# Lookups at LARGE_SHOPS are compared with the main table: the same code on
# two tables, which the target allows to differ by 10%. Measured one after the
# other, the ratio of a single round ranged from 0.6 to 1.5 on a shared
# machine, as its load came and went between the two halves of a round. Both
# sidecars are loaded at once instead, sharing the server core, so that the
# machine's load falls on both alike. A round's ratio still lands anywhere
# from 0.7 to 1.1, and the median of 10 rounds moved by 0.03 either way
# between runs of the same code, which is as much as a change in the code
# would move it; hence this many times the rounds.
SCALING_ROUNDS_FACTOR = 6
# The lookup targets at 32 connections over TCP are read against the sidecar
# and the bare server loaded at once, sharing the server core, for the same
# reason: in one run, a round's ratio of hot lookups ranged from 0.91 to 1.32
# taken in turn, seconds apart, and from 1.01 to 1.20 loaded at once. The
# load core stays under half busy with both wrk runs, so neither client holds
# its server back.
BESIDE_BARE_ROUNDS_FACTOR = 2

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Measured:
    """One load run, and the CPU time the server under test spent on it."""

    load: LoadResult
    server_cpu_s: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s / max(1, self.load.requests) * 1e6


Measurement = Callable[[], Measured]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s")
    # Threads started from here on (output readers) inherit the core.
    os.sched_setaffinity(0, {LOAD_CORE})

    RESULTS_DIR.mkdir(exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=args.workdir) as workdir:
        results = run(args, Path(workdir))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(report.markdown(results))
    log.info("figures written to %s", args.output)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--shops", type=int, default=100_000, help="shops in the main database"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=2.0,
        help="seconds of load for each measurement in each round (default 2)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of alternating measurements; medians are reported (default 5)",
    )
    parser.add_argument(
        "--memory-shops",
        type=_sizes,
        default=[300_000],
        metavar="N,N,...",
        help="also measure memory and start-up with these shop counts (default 300000)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help=f"also fill {LARGE_SHOPS:,} shops: memory, start-up, and lookups"
        " beside the main database (adds about two and a half minutes)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record py-spy profiles of the lookup and ingest paths",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR / "latest.json",
        help="where to write the figures as JSON",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=RESULTS_DIR,
        help="where the databases go: the disk whose fsync is measured",
    )
    return parser


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected shop counts separated by commas, got {text!r}"
        ) from None
    if min(sizes, default=1) < 1:
        raise argparse.ArgumentTypeError(f"expected positive shop counts, got {text!r}")
    return sizes


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Measure everything; return the figures as one JSON-ready dict."""
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "shops": args.shops,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "machine": _machine(),
    }
    db = workdir / "sidecar.db"
    log.info("filling %s shops", f"{args.shops:,}")
    results["database"] = {"fill_s": fill_database(db, args.shops)}
    results["database"]["bytes"] = _database_bytes(db)
    env = {"SIDECAR_WEBHOOK_SECRET": SECRET, "SIDECAR_PRODUCT": PRODUCT}

    with start_sidecar(db, "127.0.0.1:0", env, args.shops) as sidecar:
        sample = _sample_answer(sidecar)
        results["answer_bytes"] = len(sample)
        with start_baseline(sample) as bare:
            results["lookups"] = _lookups("tcp", sidecar, bare, args)
            results["beside_bare"] = _beside_bare(sidecar, bare, args)
            if args.profile:
                results["profiles"] = profiling.profile_lookups(
                    sidecar, args, RESULTS_DIR
                )
        memory = [_memory_of(sidecar, args.shops, results["database"]["bytes"])]
        results["ingest"] = _ingest(sidecar, db, args)
        if args.profile:
            results["profiles"] += profiling.profile_ingest(
                sidecar, args, RESULTS_DIR, SECRET
            )

    socket_dir = Path(tempfile.mkdtemp(prefix="sidecar-bench-", dir="/tmp"))
    try:
        with (
            start_sidecar(
                db, f"unix:{socket_dir}/lookup.sock", env, args.shops
            ) as sidecar,
            start_baseline(sample, f"unix:{socket_dir}/bare.sock") as bare,
        ):
            results["lookups"] += _lookups("unix", sidecar, bare, args)
    finally:
        for path in socket_dir.iterdir():
            path.unlink()
        socket_dir.rmdir()

    sizes = sorted({*args.memory_shops, *([LARGE_SHOPS] if args.large else [])})
    for shops in sizes:
        if shops == args.shops:
            continue
        with (
            _filled(workdir, shops) as other_db,
            start_sidecar(other_db, "127.0.0.1:0", env, shops) as other,
        ):
            memory.append(_memory_of(other, shops, _database_bytes(other_db)))
            if shops == LARGE_SHOPS:
                with start_sidecar(db, "127.0.0.1:0", env, args.shops) as main_sidecar:
                    results["scaling"] = _scaling(main_sidecar, other, args)
    results["memory"] = sorted(memory, key=lambda entry: entry["shops"])
    return results


def _sample_answer(sidecar: ServerProcess) -> bytes:
    status, body = http_get(sidecar.lookup_address, f"/entitlement/{shop_id(0)}")
    if status != 200:
        raise RuntimeError(f"a lookup of a bench shop answered {status}: {body!r}")
    return body


def _measure(server: ServerProcess, run_load: Callable[[], LoadResult]) -> Measured:
    before = server.cpu_seconds()
    result = run_load()
    return Measured(result, server.cpu_seconds() - before)


def _alternate(
    rounds: int, measurements: dict[str, Measurement]
) -> dict[str, list[Measured]]:
    """Take each measurement once per round, in turn.

    Every other round takes them in reverse order, so that a machine getting
    steadily busier or quieter does not favour whichever side goes first.
    """
    taken: dict[str, list[Measured]] = {name: [] for name in measurements}
    for number in range(rounds):
        log.info("  round %d of %d", number + 1, rounds)
        in_turn = list(measurements.items())
        if number % 2:
            in_turn.reverse()
        for name, measurement in in_turn:
            taken[name].append(measurement())
    return taken


def _lookups(
    transport: str,
    sidecar: ServerProcess,
    bare: ServerProcess,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    log.info("lookups over %s", transport)
    requests = {
        workload: load.lookup_requests(workload, args.shops) for workload in WORKLOADS
    }
    many = _many_clients(transport, args)
    many(bare, "hot", requests["hot"], WARM_UP_S)
    many(sidecar, "cold", requests["cold"], WARM_UP_S)

    measurements: dict[str, Measurement] = {}
    for connections in (1, MANY_CONNECTIONS):
        for name, server, workload in (
            ("bare", bare, "hot"),
            ("hot", sidecar, "hot"),
            ("cold", sidecar, "cold"),
        ):
            if connections == 1:
                measurements[f"{name}/1"] = _probe(server, requests[workload], args)
            else:
                measurements[f"{name}/{connections}"] = _bind(
                    many, server, workload, requests[workload], args.duration
                )
    taken = _alternate(args.rounds, measurements)

    rows = []
    for connections in (1, MANY_CONNECTIONS):
        client = "python" if connections == 1 or transport == "unix" else "wrk"
        bare_runs = taken[f"bare/{connections}"]
        for workload in WORKLOADS:
            rows.append(
                {
                    "transport": transport,
                    "client": client,
                    "workload": workload,
                    "connections": connections,
                    **_summary(taken[f"{workload}/{connections}"], bare_runs),
                }
            )
    return rows


def _probe(
    server: ServerProcess, requests: list[bytes], args: argparse.Namespace
) -> Measurement:
    def measurement() -> Measured:
        return _measure(
            server,
            lambda: load.run_probe(server.lookup_address, args.duration, requests),
        )

    return measurement


ManyClients = Callable[[ServerProcess, str, list[bytes], float], Measured]


def _many_clients(transport: str, args: argparse.Namespace) -> ManyClients:
    """Load with many connections: wrk over TCP, the Python client on a socket."""

    def many(
        server: ServerProcess, workload: str, requests: list[bytes], duration_s: float
    ) -> Measured:
        address = server.lookup_address
        if transport == "tcp":
            return _measure(
                server,
                lambda: load.run_wrk(
                    address, MANY_CONNECTIONS, duration_s, workload, args.shops
                ),
            )
        return _measure(
            server,
            lambda: load.run_connections(
                address, MANY_CONNECTIONS, duration_s, requests
            ),
        )

    return many


def _bind(
    many: ManyClients,
    server: ServerProcess,
    workload: str,
    requests: list[bytes],
    duration_s: float,
) -> Measurement:
    return lambda: many(server, workload, requests, duration_s)


def _summary(runs: list[Measured], ceiling_runs: list[Measured]) -> dict[str, Any]:
    """Medians over the rounds, and the median of the ratios within each round."""
    return {
        "requests_per_s": _median(run.load.requests_per_s for run in runs),
        "p50_ms": _median(run.load.p50_ms for run in runs),
        "p99_ms": _median(run.load.p99_ms for run in runs),
        "cpu_us_per_request": _median(run.cpu_us_per_request for run in runs),
        "errors": sum(run.load.errors for run in runs),
        "ratio": _median(
            run.load.requests_per_s / ceiling.load.requests_per_s
            for run, ceiling in zip(runs, ceiling_runs, strict=True)
        ),
        "ceiling": {
            "requests_per_s": _median(run.load.requests_per_s for run in ceiling_runs),
            "p50_ms": _median(run.load.p50_ms for run in ceiling_runs),
            "p99_ms": _median(run.load.p99_ms for run in ceiling_runs),
            "cpu_us_per_request": _median(
                run.cpu_us_per_request for run in ceiling_runs
            ),
        },
        "rounds": [_round(run) for run in runs],
        "ceiling_rounds": [_round(run) for run in ceiling_runs],
    }


def _round(run: Measured) -> dict[str, Any]:
    return {**asdict(run.load), "server_cpu_s": run.server_cpu_s}


def _median(values: Any) -> float:
    return float(statistics.median(list(values)))


def _ingest(
    sidecar: ServerProcess, db: Path, args: argparse.Namespace
) -> dict[str, Any]:
    log.info("ingest: in-process ceiling, then signed deliveries over HTTP")
    taken: dict[str, list[Measured]] = {"ceiling": []}
    taken.update({f"senders/{senders}": [] for senders in SENDERS})
    for number in range(args.rounds):
        log.info("  round %d of %d", number + 1, args.rounds)
        taken["ceiling"].append(_ceiling(db, args, f"ceiling{number}-"))
        for senders in SENDERS:
            deliveries = ingest.signed_deliveries(
                SECRET,
                args.shops,
                int(ingest.SIGNED_PER_S * args.duration),
                prefix=f"s{senders}r{number}-",
                seed=senders * 100 + number,
            )
            taken[f"senders/{senders}"].append(
                _send(sidecar, senders, args.duration, deliveries)
            )
    return {
        "ceiling": _summary(taken["ceiling"], taken["ceiling"]),
        "runs": [
            {
                "senders": senders,
                **_summary(taken[f"senders/{senders}"], taken["ceiling"]),
            }
            for senders in SENDERS
        ],
    }


def _send(
    sidecar: ServerProcess,
    senders: int,
    duration_s: float,
    deliveries: list[ingest.SignedDelivery],
) -> Measured:
    return _measure(
        sidecar,
        lambda: ingest.run_senders(
            sidecar.webhook_address, senders, duration_s, deliveries
        ),
    )


def _ceiling(db: Path, args: argparse.Namespace, prefix: str) -> Measured:
    # On the server's core, as the sidecar's writer would be; the ceiling's CPU
    # time is this driver's, which the report does not use.
    os.sched_setaffinity(0, {SERVER_CORE})
    try:
        result = ingest.storage_ceiling(db, args.shops, args.duration, prefix)
    finally:
        os.sched_setaffinity(0, {LOAD_CORE})
    return Measured(result, 0.0)


def _memory_of(
    sidecar: ServerProcess, shops: int, database_bytes: int
) -> dict[str, Any]:
    log.info("memory and start-up with %s shops", f"{shops:,}")
    sweep = load.lookup_requests("sweep", min(shops, SWEEP_SHOPS))
    swept = load.run_connections(
        sidecar.lookup_address, MANY_CONNECTIONS, 120.0, sweep, repeat=False
    )
    return {
        "shops": shops,
        "rss_bytes": sidecar.rss_bytes(),
        "database_bytes": database_bytes,
        "ready_s": sidecar.ready_s,
        "copied_s": sidecar.copied_s,
        # The sweep asks for each shop twice.
        "swept_shops": swept.requests // 2,
    }


def _beside_bare(
    sidecar: ServerProcess, bare: ServerProcess, args: argparse.Namespace
) -> list[dict[str, Any]]:
    log.info("lookups over tcp beside bare aiohttp, both loaded at once")
    sides = ((sidecar, args.shops), (bare, args.shops))
    return _at_once(sides, args.rounds * BESIDE_BARE_ROUNDS_FACTOR, args.duration)


def _scaling(
    main_sidecar: ServerProcess, large: ServerProcess, args: argparse.Namespace
) -> list[dict[str, Any]]:
    log.info("lookups at %s shops beside %s", f"{LARGE_SHOPS:,}", f"{args.shops:,}")
    sides = ((large, LARGE_SHOPS), (main_sidecar, args.shops))
    _side_by_side(sides, "cold", 3 * WARM_UP_S)
    rows = _at_once(sides, args.rounds * SCALING_ROUNDS_FACTOR, args.duration)
    return [{**row, "shops": LARGE_SHOPS, "ceiling_shops": args.shops} for row in rows]


def _at_once(
    sides: tuple[tuple[ServerProcess, int], tuple[ServerProcess, int]],
    rounds: int,
    duration_s: float,
) -> list[dict[str, Any]]:
    """Load both servers at once, each workload once per round.

    Each row's ratios are the first server's figures over the second's.
    """
    taken: dict[str, tuple[list[Measured], list[Measured]]] = {
        workload: ([], []) for workload in WORKLOADS
    }
    for number in range(rounds):
        log.info("  round %d of %d", number + 1, rounds)
        for workload in WORKLOADS:
            first, second = _side_by_side(sides, workload, duration_s)
            taken[workload][0].append(first)
            taken[workload][1].append(second)
    return [
        {
            "workload": workload,
            "connections": MANY_CONNECTIONS,
            "rounds_taken": rounds,
            "duration_s": duration_s,
            **_summary(*taken[workload]),
        }
        for workload in WORKLOADS
    ]


def _side_by_side(
    sides: Sequence[tuple[ServerProcess, int]], workload: str, duration_s: float
) -> list[Measured]:
    """Load every server at once, each with a wrk of its own on the load core.

    The servers share the server core, so each runs at about its share of it,
    but whatever else the machine does meanwhile slows all of them alike.
    """

    def measure(server: ServerProcess, shops: int) -> Measured:
        return _measure(
            server,
            lambda: load.run_wrk(
                server.lookup_address, MANY_CONNECTIONS, duration_s, workload, shops
            ),
        )

    with ThreadPoolExecutor(len(sides)) as pool:
        running = [pool.submit(measure, server, shops) for server, shops in sides]
        return [future.result() for future in running]


@contextlib.contextmanager
def _filled(workdir: Path, shops: int) -> Any:
    db = workdir / f"shops-{shops}.db"
    log.info("filling %s shops", f"{shops:,}")
    fill_database(db, shops)
    try:
        yield db
    finally:
        for path in db.parent.glob(db.name + "*"):
            path.unlink()


def _database_bytes(db: Path) -> int:
    return sum(
        path.stat().st_size
        for path in (db, db.with_name(db.name + "-wal"))
        if path.exists()
    )


def _machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
