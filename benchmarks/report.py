"""Results as JSON, Markdown tables and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import BODIES, BODY_LABELS, LABELS


def _ms(value: float, signed: bool = False) -> str:
    if value != value:  # NaN
        return "n/a"
    digits = 3 if abs(value) < 1 else (2 if abs(value) < 10 else (1 if abs(value) < 100 else 0))
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _spread(stat: dict[str, Any], signed: bool = True) -> str:
    return f"{_ms(stat['median'], signed)} [{_ms(stat['p25'], signed)}, {_ms(stat['p75'], signed)}]"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, shown next to what was measured. Nothing is asserted."""
    out: list[dict[str, Any]] = []
    timing = results.get("timing", {})
    for size, cell in timing.items():
        write = cell.get("write", {})
        sar = write.get("sa_rollback")
        if sar and "vs_none" in sar:
            diff = sar["vs_none"]["diff"]["median"]
            out.append(
                {
                    "target": f"sa_rollback overhead over no isolation, body (a), {size} tables <= 0.2 ms",
                    "measured": f"{diff:+.3f} ms",
                    "met": diff <= 0.2,
                }
            )
    trips = results.get("round_trips", {})
    if trips:
        size = next(iter(trips))
        write = trips[size]["write"]
        if "sa_rollback" in write and "recipe" in write:
            a, b = write["sa_rollback"]["round_trips"], write["recipe"]["round_trips"]
            out.append(
                {
                    "target": "fewer round trips than the recipe, body (a)",
                    "measured": f"{a} vs {b}",
                    "met": a < b,
                }
            )
    for size in ("20", *timing.keys()):
        write = timing.get(size, {}).get("write", {})
        if "truncate" in write and "sa_rollback" in write:
            trunc = write["truncate"]["vs_none"]["diff"]["median"]
            sar = write["sa_rollback"]["vs_none"]["diff"]["median"]
            # Overheads below 0.01 ms are at the noise floor; the ratio is taken against that floor.
            ratio = trunc / max(sar, 0.01)
            out.append(
                {
                    "target": f">= 10x cheaper than TRUNCATE of {size} tables (overhead over no isolation, body (a))",
                    "measured": f"TRUNCATE {trunc:+.2f} ms vs sa_rollback {sar:+.3f} ms ({ratio:.0f}x)",
                    "met": ratio >= 10,
                }
            )
            break
    nodb = results.get("nodb", {})
    for key, how in (("pytest", "default options"), ("pytest_lean", "capture and logging off, less noise")):
        if key in nodb:
            stat = nodb[key]["plugin_overhead_us_per_test"]
            out.append(
                {
                    "target": f"<= 20 us per test that touches no database (pytest, plugin on vs off, {how})",
                    "measured": f"{stat['median']:.1f} us [p25 {stat['p25']:.1f}, p75 {stat['p75']:.1f}]",
                    "met": stat["median"] <= 20,
                }
            )
    if "core" in nodb:
        us = nodb["core"]["overhead_us"]["median"]
        out.append(
            {
                "target": "<= 20 us per test that touches no database (core: rollback_scope() enter + exit)",
                "measured": f"{us:.2f} us",
                "met": us <= 20,
            }
        )
    suites = results.get("suites", {}).get("strategies", {})
    if "speedup_n2" in suites.get("none", {}) and "speedup_n2" in suites.get("sa_rollback", {}):
        base = suites["none"]["speedup_n2"]["median"]
        sar = suites["sa_rollback"]["speedup_n2"]["median"]
        out.append(
            {
                "target": "-n 2 scaling within 10% of the baseline's",
                "measured": f"serial/-n 2 speed-up {sar:.2f}x vs baseline {base:.2f}x ({sar / base:.0%})",
                "met": sar >= 0.9 * base,
            }
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = results["meta"]
    machine = meta["machine"]
    lines += [
        f"Mode `{meta['mode']}`, {meta['duration_s']:.0f} s, {meta['started']}. "
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), PostgreSQL {machine['postgresql']}, "
        f"Python {machine['python']}, SQLAlchemy {machine['sqlalchemy']}, psycopg {machine['psycopg']} "
        f"({machine['psycopg_impl']}, libpq {machine['libpq']}), psycopg2 {machine['psycopg2']}, "
        f"pytest {machine['pytest']}, pytest-xdist {machine['pytest_xdist']}.",
        "",
    ]
    if results.get("targets"):
        lines += ["### Targets (shown, not asserted)", "", "| target | measured | met |", "| --- | --- | --- |"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    timing = results.get("timing", {})
    if timing:
        lines += [
            "### Per-test time and overhead (paired, interleaved; ms, median [p25, p75])",
            "",
            "Each round runs one test of every strategy in rotating order; differences and ratios are "
            "taken within a round, then summarized.",
            "",
        ]
        for body in BODIES:
            lines += [
                f"#### Body {BODY_LABELS[body]}",
                "",
                "| tables | strategy | per test | Δ vs no isolation | ratio to no isolation | Δ vs recipe | rounds |",
                "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for size, cell in timing.items():
                for key, entry in cell.get(body, {}).items():
                    vs_none = entry.get("vs_none")
                    vs_recipe = entry.get("vs_recipe")
                    ratio = f"{vs_none['ratio']['median']:.2f}x" if vs_none else "—"
                    lines.append(
                        f"| {size} | {LABELS[key]} | {_ms(entry['ms']['median'])} | "
                        f"{_spread(vs_none['diff']) if vs_none else '—'} | {ratio} | "
                        f"{_spread(vs_recipe['diff']) if vs_recipe else '—'} | {entry['rounds']} |"
                    )
            lines.append("")
    if results.get("rows_left"):
        keys = list(next(iter(results["rows_left"].values())))
        lines += [
            "### Rows left behind after the body (a) runs",
            "",
            "| tables | " + " | ".join(LABELS[k] for k in keys) + " |",
            "| ---: |" + " ---: |" * len(keys),
        ]
        for size, left in results["rows_left"].items():
            lines.append(f"| {size} | " + " | ".join(str(left[k]) for k in keys) + " |")
        lines.append("")
    for title, key in (("psycopg 3", "round_trips"), ("psycopg2", "round_trips_psycopg2")):
        trips = results.get(key)
        if not trips:
            continue
        sizes = list(trips)
        strategies = list(next(iter(trips.values()))["write"])
        header = " | ".join(f"({b[0]}) {s}t" for s in sizes for b in (("a",), ("b",), ("c",)))
        lines += [
            f"### Round trips per test, counted from the libpq trace ({title})",
            "",
            "Columns: body (a) write, (b) read, (c) no database, per schema size (`5t` = 5 tables). "
            "Steady state after 6 warm-up tests; new connections opened per test in the last column.",
            "",
            f"| strategy | {header} | new connections (a) |",
            "| --- |" + " ---: |" * (3 * len(sizes) + 1),
        ]
        for strategy in strategies:
            cells = [
                str(trips[s][b][strategy]["round_trips"]) for s in sizes for b in BODIES if strategy in trips[s][b]
            ]
            conns = trips[sizes[0]]["write"][strategy]["connections_opened"]
            lines.append(f"| {LABELS[strategy]} | " + " | ".join(cells) + f" | {conns} |")
        lines.append("")
        if key == "round_trips":
            write = trips[sizes[0]]["write"]
            lines += [f"Statements of body (a), {sizes[0]} tables, one round trip each:", ""]
            for strategy in ("none", "recipe", "sa_rollback"):
                if strategy in write:
                    statements = " → ".join(f"`{s}`" for s in write[strategy]["statements"])
                    lines.append(f"* {LABELS[strategy]}: {statements}")
            lines.append("")
    suites = results.get("suites")
    if suites:
        lines += [
            f"### Whole suite: {suites['tests']} tests, {suites['tables']} tables, median of {suites['reps']} "
            "interleaved runs (s)",
            "",
            "Two in five tests run body (a), two body (b), one body (c). Wall time of the pytest subprocess.",
            "",
            "| strategy | serial | Δ vs no isolation | -n 2 | Δ vs no isolation | speed-up with -n 2 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, entry in suites["strategies"].items():
            serial = entry.get("wall_s_serial")
            n2 = entry.get("wall_s_n2")
            d_serial = entry.get("vs_none_serial_s")
            d_n2 = entry.get("vs_none_n2_s")
            speed = entry.get("speedup_n2")
            lines.append(
                f"| {LABELS[key]} | {_ms(serial['median']) if serial else '—'} | "
                f"{_ms(d_serial['diff']['median'], True) if d_serial else '—'} | "
                f"{_ms(n2['median']) if n2 else '—'} | {_ms(d_n2['diff']['median'], True) if d_n2 else '—'} | "
                f"{(format(speed['median'], '.2f') + 'x') if speed else '—'} |"
            )
        lines.append("")
    nodb = results.get("nodb", {})
    if nodb:
        lines += ["### A test that touches no database", "", "| measurement | µs per test |", "| --- | ---: |"]
        for key in ("pytest", "pytest_lean"):
            if key not in nodb:
                continue
            p = nodb[key]
            how = f"`{' '.join(p['pytest_args'])}`" if p.get("pytest_args") else "default options"
            lines += [
                f"| pytest ({how}), plugin not loaded: median test (setup + call + teardown), {p['tests']} tests | "
                f"{_spread(p['plain_us_per_test'], False)} |",
                f'| pytest ({how}), `pytest_plugins = ["sa_rollback"]`: median test | '
                f"{_spread(p['plugin_us_per_test'], False)} |",
                f"| **plugin overhead per test** ({how}; paired runs, difference of medians) | "
                f"**{_spread(p['plugin_overhead_us_per_test'])}** |",
            ]
            if "plugin_overhead_us_min_to_min" in p:
                lines.append(
                    f"| plugin overhead, fastest run with plugin minus fastest run without ({how}) | "
                    f"{_ms(p['plugin_overhead_us_min_to_min'], True)} |"
                )
            if "loop_overhead_us_per_test" in p:
                lines.append(
                    f"| plugin overhead from whole test-loop times ({how}; noisier) | "
                    f"{_spread(p['loop_overhead_us_per_test'])} |"
                )
        if "core" in nodb:
            c = nodb["core"]
            lines += [
                f"| core: `with rollback_scope(): pass` | {_spread(c['scope_us'], False)} |",
                f"| core: empty `with` | {_spread(c['empty_with_us'], False)} |",
                f"| **core overhead** | **{_spread(c['overhead_us'])}** |",
            ]
        lines.append("")
    prov = results.get("provisioning", {})
    if prov:
        lines += [
            "### Provisioning (ms, median [p25, p75])",
            "",
            "| tables | CREATE DATABASE ... TEMPLATE | DROP DATABASE | CREATE DATABASE (empty) | create_all |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for size, entry in prov.get("databases", {}).items():
            lines.append(
                f"| {size} | {_spread(entry['clone_from_template_ms'], False)} | "
                f"{_spread(entry['drop_database_ms'], False)} | {_spread(entry['create_empty_database_ms'], False)} | "
                f"{_spread(entry['create_all_ms'], False)} |"
            )
        server = prov.get("embedded_server")
        if server:
            lines.append("")
            if server.get("available"):
                lines.append(
                    f"Embedded server (`{server['module']}`): cold start (initdb + start + first query) "
                    f"{_spread(server['cold_start_ms'], False)} ms, warm start (existing data directory) "
                    f"{_spread(server['warm_start_ms'], False)} ms."
                )
            else:
                lines.append(f"Embedded server not measured: {server.get('reason')}.")
        lines.append("")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    """Per-test time by strategy, body and schema size, on a log scale. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timing = results.get("timing", {})
    if not timing:
        return False
    sizes = list(timing)
    strategies = list(next(iter(timing.values()))["write"])
    cheap = [k for k in ("recipe", "sa_rollback") if k in strategies]
    fig, grid = plt.subplots(2, len(BODIES), figsize=(5 * len(BODIES), 8.5), sharey="row", squeeze=False)
    width = 0.8 / len(strategies)
    colors = {key: f"C{i}" for i, key in enumerate(strategies)}
    for ax, body in zip(grid[0], BODIES):
        for i, key in enumerate(strategies):
            xs = [n + (i - (len(strategies) - 1) / 2) * width for n in range(len(sizes))]
            ys = [max(timing[s][body][key]["ms"]["median"], 1e-3) for s in sizes]
            ax.bar(xs, ys, width, label=LABELS[key], color=colors[key])
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{s} tables" for s in sizes])
        ax.set_title(f"body {BODY_LABELS[body]}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    grid[0][0].set_ylabel("time per test, ms (median, log scale)")
    # The transactional strategies' overhead is invisible on the log scale above; this row shows it.
    width = 0.8 / max(len(cheap), 1)
    for ax, body in zip(grid[1], BODIES):
        for i, key in enumerate(cheap):
            xs = [n + (i - (len(cheap) - 1) / 2) * width for n in range(len(sizes))]
            diffs = [timing[s][body][key]["vs_none"]["diff"] for s in sizes]
            ys = [d["median"] for d in diffs]
            err = [[d["median"] - d["p25"] for d in diffs], [d["p75"] - d["median"] for d in diffs]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=LABELS[key], color=colors[key])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(0.2, color="grey", linestyle="--", linewidth=0.8, label="target: 0.2 ms")
        ax.set_xticks(range(len(sizes)), [f"{s} tables" for s in sizes])
        ax.grid(axis="y", alpha=0.3)
    grid[1][0].set_ylabel("overhead over no isolation, ms\n(paired median, bars: p25-p75)")
    grid[1][-1].legend(fontsize=8, loc="upper right")
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(strategies), fontsize=8)
    fig.suptitle("Per-test time of each isolation strategy, and overhead of the transactional ones")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    written[1].write_text(markdown(results) + "\n")
    if chart(results, out / "overhead.png"):
        written.append(out / "overhead.png")
    return written
