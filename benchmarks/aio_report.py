"""The async section of the results: its targets and its tables."""

from __future__ import annotations

import math
from typing import Any

from .aio_strategies import AIO_LABELS

GROUP_LABELS: dict[str, str] = {
    "shared": "one loop for all tests",
    "fresh": "a loop per test",
    "sync": "sync (reference)",
}
DRIVER_LABELS: dict[str, str] = {"asyncpg": "asyncpg", "psycopg": "psycopg async", "sync": "psycopg (sync)"}


def _ms(value: float, signed: bool = False) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _ci(stat: dict[str, Any], signed: bool = True) -> str:
    ci = stat["ci95"]
    return _ms(stat["mean"], signed) + (f" ± {ci:.3f}" if ci == ci else "")


def _trips(entry: dict[str, Any]) -> str:
    if entry["min"] == entry["max"]:
        return str(entry["max"])
    return f"{entry['mean']:.2f} / {entry['max']}"


def _label(group: dict[str, Any]) -> str:
    return f"{DRIVER_LABELS[group['driver']]}, {GROUP_LABELS[group['style']]}"


def aio_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's targets for async engines, next to what was measured. Nothing is asserted.

    "No worse than the sync path" is met when the async overhead exceeds the
    sync one by no more than the combined half-width of their 95% intervals,
    that is, when the run cannot tell it worse.
    """
    groups = results.get("async", {}).get("groups", {})
    sync = groups.get("sync/sync")
    out: list[dict[str, Any]] = []
    for group in groups.values():
        if group["driver"] == "sync":
            continue
        sar = group["timing"]["sa_rollback"]["vs_none"]
        if sync is not None:
            ref = sync["timing"]["sa_rollback"]["vs_none"]
            for clock, what in (("wall_ms", "wall"), ("cpu_ms", "CPU")):
                a, s = sar[clock], ref[clock]
                margin = math.hypot(a["ci95"], s["ci95"])
                out.append(
                    {
                        "target": f"async overhead over no isolation ({what}) no worse than the sync path's, "
                        f"{_label(group)}",
                        "measured": f"{_ci(a)} ms vs sync {_ci(s)} ms",
                        "met": bool(a["mean"] - s["mean"] <= margin),
                    }
                )
        trips = group["round_trips"]
        out.append(
            {
                "target": f"fewer round trips than the async recipe, {_label(group)}",
                "measured": f"{_trips(trips['sa_rollback'])} vs {_trips(trips['recipe'])}",
                "met": bool(trips["sa_rollback"]["max"] < trips["recipe"]["min"]),
            }
        )
    return out


def aio_markdown(results: dict[str, Any]) -> list[str]:
    section = results.get("async")
    if not section:
        return []
    lines = [
        "### Async engines: a request (insert a row, commit, read it back) through an `AsyncSession`",
        "",
        f"{section['tables']} tables. Each group is its own paired run: {section['rounds']} rounds of one block "
        f"of {section['tests_per_block']} tests of each of strategies 1, 2 and 4, then {section['costly_rounds']} "
        "rounds of all four (TRUNCATE's figures come from these), in an order that rotates, and reverses every "
        "other cycle; a Δ is the mean over the rounds of the difference between two strategies' blocks of the "
        "same round, ± the half-width of its 95% confidence interval, in ms per test. "
        "CPU is the time of the thread that runs the loop (the loop, the "
        "driver and SQLAlchemy). Round trips: every one of "
        f"{section['counted_tests']} tests counted on new engines after two warm-up tests (a cell is the count when "
        "all were equal, else `mean / max`); new connections per test beside them.",
        "",
        "| loop | driver | strategy | wall per test | Δ wall vs no isolation | Δ wall vs recipe | CPU per test "
        "| Δ CPU vs no isolation | Δ CPU vs recipe | round trips | new connections | rows left |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for group in section["groups"].values():
        timing, trips = group["timing"], group["round_trips"]
        for key, label in AIO_LABELS.items():
            entry = timing[key]
            cells = [
                _ci(entry["wall_ms"], False),
                _ci(entry["vs_none"]["wall_ms"]) if "vs_none" in entry else "—",
                _ci(entry["vs_recipe"]["wall_ms"]) if "vs_recipe" in entry else "—",
                _ci(entry["cpu_ms"], False),
                _ci(entry["vs_none"]["cpu_ms"]) if "vs_none" in entry else "—",
                _ci(entry["vs_recipe"]["cpu_ms"]) if "vs_recipe" in entry else "—",
                _trips(trips[key]),
                f"{trips[key]['connections_opened_mean']:g}",
                str(timing["rows_left"][key]),
            ]
            lines.append(
                f"| {GROUP_LABELS[group['style']]} | {DRIVER_LABELS[group['driver']]} | {label} | "
                + " | ".join(cells)
                + " |"
            )
    lines.append("")
    first = next(iter(section["groups"].values()))
    for group in section["groups"].values():
        if group["style"] == "fresh" or group is first:
            lines += [f"Statements of one test, {_label(group)}:", ""]
            for key in ("none", "recipe", "sa_rollback"):
                entry = group["round_trips"][key]
                lines.append(f"* {AIO_LABELS[key]}: " + " → ".join(f"`{s}`" for s in entry["statements"]))
            lines.append("")
    return lines
