"""The bench figures as markdown tables, and the targets they are read against."""

from __future__ import annotations

import statistics
from typing import Any

_MB = 1024 * 1024
_RSS_SHOPS = 300_000
_RSS_LIMIT_BYTES = 100 * _MB
_LARGE_SHOPS = 1_000_000


def markdown(results: dict[str, Any]) -> str:
    """Render the figures of one run, as written to the JSON file."""
    machine = results["machine"]
    sections = [
        f"## Sidecar bench, {results['started_at']}",
        f"{results['shops']:,} shops; each figure is the median of"
        f" {results['rounds']} rounds of {results['duration_s']:g} s, and each"
        " ratio the median of the ratios within a round. Server on core 0, load"
        f" on core 1; {machine['cpus']} x {machine['cpu']}, Python"
        f" {machine['python']}, {machine['platform']}.",
        _lookups(results["lookups"]),
        _at_once(
            results["beside_bare"],
            "lookups, 32 conns, tcp, at once",
            "bare",
            "The sidecar and the bare server loaded at once, each by a wrk of its"
            " own and sharing the server core, for the ratios the targets at 32"
            " connections are read against.",
        ),
        _ingest(results["ingest"]),
    ]
    if "scaling" in results:
        sections.append(
            _at_once(
                results["scaling"],
                f"lookups at {_LARGE_SHOPS:,} shops, 32 conns",
                "main size",
                "The same code on two tables, both loaded at once and sharing the"
                " server core, so that each runs at about half its speed alone.",
            )
        )
    sections.append(_memory(results["memory"], results["database"]))
    sections.append(_targets(results))
    if "profiles" in results:
        sections.append(_profiles(results["profiles"]))
    return "\n\n".join(sections) + "\n"


def _lookups(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| lookups | client | conns | shops | req/s | x bare | p50 ms | p99 ms"
        " | CPU us/req | bare req/s | bare p99 ms | bare CPU us/req |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        bare = row["ceiling"]
        lines.append(
            f"| {row['transport']} | {row['client']} | {row['connections']}"
            f" | {row['workload']} | {row['requests_per_s']:,.0f}"
            f" | {row['ratio']:.2f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f}"
            f" | {row['cpu_us_per_request']:.0f} | {bare['requests_per_s']:,.0f}"
            f" | {bare['p99_ms']:.3f} | {bare['cpu_us_per_request']:.0f} |"
        )
    return "\n".join(lines)


def _at_once(rows: list[dict[str, Any]], heading: str, ceiling: str, how: str) -> str:
    """A table of two servers loaded at once, the second being the ceiling."""
    lines = [
        f"| {heading} | req/s | {ceiling} req/s | x {ceiling}"
        f" | middle half of rounds | CPU us/req | {ceiling} CPU us/req |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        low, high = _middle_half(row)
        other = row["ceiling"]
        lines.append(
            f"| {row['workload']} | {row['requests_per_s']:,.0f}"
            f" | {other['requests_per_s']:,.0f} | {row['ratio']:.2f}"
            f" | {low:.2f} to {high:.2f} | {row['cpu_us_per_request']:.0f}"
            f" | {other['cpu_us_per_request']:.0f} |"
        )
    first = rows[0]
    lines.append(
        f"\n{how} Each figure here is the median of {first['rounds_taken']}"
        f" rounds of {first['duration_s']:g} s, and each ratio the median of the"
        " ratios within a round; half of those ratios fall in the range given."
    )
    return "\n".join(lines)


def _ingest(figures: dict[str, Any]) -> str:
    ceiling = figures["ceiling"]
    lines = [
        "| ingest | acked/s | x ceiling | p50 ms | p99 ms | failed | CPU us/delivery |",
        "|---|--:|--:|--:|--:|--:|--:|",
        f"| in-process sqlite3, 1 transaction each | {ceiling['requests_per_s']:,.0f}"
        f" | 1.00 | {ceiling['p50_ms']:.3f} | {ceiling['p99_ms']:.3f} | 0 | |",
    ]
    for run in figures["runs"]:
        lines.append(
            f"| {run['senders']} sender(s) over HTTP | {run['requests_per_s']:,.0f}"
            f" | {run['ratio']:.2f} | {run['p50_ms']:.3f} | {run['p99_ms']:.3f}"
            f" | {run['errors']} | {run['cpu_us_per_request']:.0f} |"
        )
    return "\n".join(lines)


def _middle_half(row: dict[str, Any]) -> tuple[float, float]:
    """The first and third quartiles of the rounds' ratios."""
    ratios = [
        run["requests_per_s"] / ceiling["requests_per_s"]
        for run, ceiling in zip(row["rounds"], row["ceiling_rounds"], strict=True)
    ]
    low, _, high = statistics.quantiles(ratios, n=4)
    return low, high


def _memory(entries: list[dict[str, Any]], database: dict[str, Any]) -> str:
    lines = [
        "| shops | RSS MB | database MB | ready s | in memory s"
        " | shops looked up first |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for entry in entries:
        lines.append(
            f"| {entry['shops']:,} | {entry['rss_bytes'] / _MB:.1f}"
            f" | {entry['database_bytes'] / _MB:.1f} | {entry['ready_s']:.2f}"
            f" | {entry['copied_s']:.2f} | {entry['swept_shops']:,} |"
        )
    lines.append("")
    lines.append(
        f"Filling the main database took {database['fill_s']:.1f} s. RSS is read"
        " after lookups of enough distinct shops, each asked for twice, to fill"
        " the answer cache; ready is from the fork to the first 200 from /readyz,"
        " in memory to when the sidecar's copy of the table is loaded. Lookups"
        " read SQLite between the two; every figure here is measured after."
    )
    return "\n".join(lines)


def _ratio(ratio: float) -> str:
    # Three decimals, so that a ratio just under its target never reads as on it.
    return f"{ratio:.3f}x"


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Each target, the figure it is read against, and whether it is met."""
    checks: list[tuple[str, str, bool | None]] = []

    def lookup(workload: str, connections: int) -> dict[str, Any]:
        rows: list[dict[str, Any]] = results["lookups"]
        for row in rows:
            if (row["transport"], row["workload"], row["connections"]) == (
                "tcp",
                workload,
                connections,
            ):
                return row
        raise LookupError(f"no tcp {workload} lookups at {connections} connections")

    beside_bare = {row["workload"]: row for row in results["beside_bare"]}
    for workload, least in (("hot", 1.0), ("cold", 0.5)):
        ratio = beside_bare[workload]["ratio"]
        checks.append(
            (
                f"{workload} lookups at 32 conns >= {least:.1f}x bare aiohttp",
                _ratio(ratio),
                ratio >= least,
            )
        )
    for workload in ("hot", "cold"):
        p99 = lookup(workload, 1)["p99_ms"]
        checks.append(
            (
                f"p99 of {workload} lookups at 1 conn < 0.3 ms",
                f"{p99:.3f} ms",
                p99 < 0.3,
            )
        )

    for row in results.get("scaling", []):
        checks.append(
            (
                f"{row['workload']} lookups at 1M shops within 10% of"
                f" {row['ceiling_shops']:,}",
                _ratio(row["ratio"]),
                row["ratio"] >= 0.9,
            )
        )
    if "scaling" not in results:
        checks.append(("lookups at 1M shops within 10% of 100k", "run --large", None))

    memory = {entry["shops"]: entry for entry in results["memory"]}
    if _RSS_SHOPS in memory:
        rss = memory[_RSS_SHOPS]["rss_bytes"]
        checks.append(
            (
                "RSS at 300,000 shops < 100 MB",
                f"{rss / _MB:.1f} MB",
                rss < _RSS_LIMIT_BYTES,
            )
        )
    ratio = next(
        run["ratio"] for run in results["ingest"]["runs"] if run["senders"] == 16
    )
    checks.append(
        (
            "ingest at 16 senders >= 1.0x in-process ceiling",
            _ratio(ratio),
            ratio >= 1.0,
        )
    )
    if _LARGE_SHOPS in memory:
        ready = memory[_LARGE_SHOPS]["ready_s"]
        checks.append(("ready < 1 s with 1M shops", f"{ready:.2f} s", ready < 1.0))
    else:
        checks.append(("ready < 1 s with 1M shops", "run --large", None))
    return checks


def _targets(results: dict[str, Any]) -> str:
    lines = ["| target | measured | met |", "|---|--:|---|"]
    for target, measured, met in targets(results):
        verdict = "not measured" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {target} | {measured} | {verdict} |")
    return "\n".join(lines)


def _profiles(profiles: list[dict[str, Any]]) -> str:
    parts = []
    for profile in profiles:
        top = ", ".join(
            f"{entry['function']} {entry['percent']}%" for entry in profile["self"][:8]
        )
        parts.append(f"- {profile['name']} ({profile['samples']} samples): {top}")
    return "Most sampled functions (own time):\n\n" + "\n".join(parts)
