"""Results as JSON, Markdown tables and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .aio_report import aio_markdown, aio_targets
from .config import BODIES, BODY_LABELS, LABELS, REFERENCES


def _ms(value: float, signed: bool = False) -> str:
    if value != value:  # NaN
        return "n/a"
    digits = 3 if abs(value) < 1 else (2 if abs(value) < 10 else (1 if abs(value) < 100 else 0))
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ci(stat: dict[str, Any], signed: bool = True) -> str:
    """``mean ± half-width of the 95% confidence interval``."""
    ci = stat["ci95"]
    spread = f" ± {_ms(ci)}" if ci == ci else ""
    return f"{_ms(stat['mean'], signed)}{spread}"


def _upper(stat: dict[str, Any]) -> float:
    ci = stat["ci95"]
    return float(stat["mean"] + (ci if ci == ci else 0.0))


def _trip_cell(entry: dict[str, Any]) -> str:
    """Round trips of a run of tests: ``5`` when every test sent the same, else ``mean / max``."""
    if entry["min"] == entry["max"]:
        return str(entry["max"])
    return f"{entry['mean']:.2f} / {entry['max']}"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' targets, shown next to what was measured. Nothing is asserted.

    A time target is met when the upper end of the 95% confidence interval of
    the mean is within it.
    """
    out: list[dict[str, Any]] = []
    timing = results.get("timing", {})
    for size, cell in timing.items():
        sar = cell.get("write", {}).get("sa_rollback")
        if sar and "vs_none" in sar:
            diff = sar["vs_none"]["diff"]
            out.append(
                {
                    "target": f"sa_rollback overhead over no isolation, body (a), {size} tables <= 0.2 ms",
                    "measured": f"{_ci(diff)} ms",
                    "met": _upper(diff) <= 0.2,
                }
            )
    for title, key in (("psycopg 3", "round_trips"), ("psycopg2", "round_trips_psycopg2")):
        for size, trips in results.get(key, {}).items():
            entry = trips["write"].get("sa_rollback")
            if entry:
                out.append(
                    {
                        "target": f"exactly 5 round trips on every body (a) test, {title}, {size} tables",
                        "measured": f"mean {entry['mean']:.2f}, max {entry['max']} over {entry['tests']} tests",
                        "met": entry["min"] == entry["max"] == 5,
                    }
                )
    for size in ("20", *timing.keys()):
        write = timing.get(size, {}).get("write", {})
        if "truncate" in write and "sa_rollback" in write:
            trunc = write["truncate"]
            sar = write["sa_rollback"]["vs_none"]["diff"]
            # Compared as differences, never as a ratio: sa_rollback's overhead is close to zero.
            out.append(
                {
                    "target": f"overhead at most a tenth of TRUNCATE's, {size} tables, body (a)",
                    "measured": f"sa_rollback {_ci(sar)} ms vs TRUNCATE {_ci(trunc['vs_none']['diff'])} ms over "
                    f"no isolation; TRUNCATE - sa_rollback {_ci(trunc['vs_sa_rollback']['diff'])} ms per test",
                    "met": _upper(sar) <= 0.1 * (trunc["vs_none"]["diff"]["mean"] - trunc["vs_none"]["diff"]["ci95"]),
                }
            )
            break
    hot = results.get("hot_path", {})
    if "checkout" in hot:
        stat = hot["checkout"]["in_scope"]["plugin_us"]
        out.append(
            {
                "target": "<= 10 us of plugin code per checkout inside a scope",
                "measured": f"{_ci(stat)} us",
                "met": _upper(stat) <= 10,
            }
        )
    if "nodb_test" in hot:
        stat = hot["nodb_test"]["plugin_us"]
        out.append(
            {
                "target": "<= 5 us per test that touches no database (pytest, plugin on vs off, paired in one run)",
                "measured": f"{_ci(stat)} us",
                "met": _upper(stat) <= 5,
            }
        )
    suites = results.get("suites", {}).get("strategies", {})
    if "speedup_n2" in suites.get("none", {}) and "speedup_n2" in suites.get("sa_rollback", {}):
        base = suites["none"]["speedup_n2"]["mean"]
        sar = suites["sa_rollback"]["speedup_n2"]["mean"]
        out.append(
            {
                "target": "-n 2 scaling within 10% of the baseline's",
                "measured": f"serial/-n 2 speed-up {sar:.2f}x vs baseline {base:.2f}x",
                "met": sar >= 0.9 * base,
            }
        )
    out += aio_targets(results)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = results["meta"]
    machine = meta["machine"]
    fsync = machine.get("fsync", "?")
    lines += [
        f"Mode `{meta['mode']}`, {meta['duration_s']:.0f} s, {meta['started']}. "
        f"Server {machine.get('server', '?')} (fsync {fsync}{'' if fsync == 'on' else ': commits cost less'}). "
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), PostgreSQL {machine['postgresql']}, "
        f"Python {machine['python']}, SQLAlchemy {machine['sqlalchemy']}, psycopg {machine['psycopg']} "
        f"({machine['psycopg_impl']}, libpq {machine['libpq']}), psycopg2 {machine['psycopg2']}, "
        f"pytest {machine['pytest']}, pytest-xdist {machine['pytest_xdist']}. "
        f"sa_rollback at {machine.get('git_head') or '?'}"
        + (" with uncommitted changes" if machine.get("sa_rollback_modified_files") else "")
        + ".",
        "",
        "Times are means ± the half-width of their 95% confidence interval.",
        "",
    ]
    if results.get("targets"):
        lines += ["### Targets (shown, not asserted)", "", "| target | measured | met |", "| --- | --- | --- |"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    lines += _timing_tables(results)
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
    lines += _round_trip_tables(results)
    lines += aio_markdown(results)
    lines += _suite_table(results)
    lines += _hot_path_tables(results)
    lines += _nodb_table(results)
    lines += _provisioning(results)
    return "\n".join(lines)


def _timing_tables(results: dict[str, Any]) -> list[str]:
    timing = results.get("timing", {})
    if not timing:
        return []
    lines = [
        "### Per-test time and paired differences (ms)",
        "",
        "Each round runs one test of every strategy, in an order that rotates from round to round. A "
        "difference is taken within each round, then averaged over the rounds.",
        "",
    ]
    for body in BODIES:
        lines += [
            f"#### Body {BODY_LABELS[body]}",
            "",
            "| tables | strategy | per test | Δ vs no isolation | Δ vs recipe | Δ vs sa_rollback | rounds |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for size, cell in timing.items():
            for key, entry in cell.get(body, {}).items():
                deltas = [_ci(entry[f"vs_{ref}"]["diff"]) if f"vs_{ref}" in entry else "—" for ref in REFERENCES]
                lines.append(
                    f"| {size} | {LABELS[key]} | {_ci(entry['ms'], False)} | {' | '.join(deltas)} | {entry['rounds']} |"
                )
        lines.append("")
    return lines


def _round_trip_tables(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for title, key in (("psycopg 3", "round_trips"), ("psycopg2", "round_trips_psycopg2")):
        trips = results.get(key)
        if not trips:
            continue
        sizes = list(trips)
        strategies = list(next(iter(trips.values()))["write"])
        first = trips[sizes[0]]["write"][strategies[0]]
        header = " | ".join(f"({b[0]}) {s}t" for s in sizes for b in (("a",), ("b",), ("c",)))
        lines += [
            f"### Round trips per test, counted from the libpq trace ({title})",
            "",
            f"Every test of a run of {first['tests']} is counted, after a first test that opens the engine's "
            "connections. A cell is the count when every test sent the same, else `mean / max`. Columns: body "
            "(a) write, (b) read, (c) no database, per schema size (`5t` = 5 tables); last, the connections "
            "opened per test of body (a).",
            "",
            f"| strategy | {header} | new connections (a) |",
            "| --- |" + " ---: |" * (3 * len(sizes) + 1),
        ]
        for strategy in strategies:
            cells = [_trip_cell(trips[s][b][strategy]) for s in sizes for b in BODIES if strategy in trips[s][b]]
            conns = trips[sizes[0]]["write"][strategy]["connections_opened_mean"]
            lines.append(f"| {LABELS[strategy]} | " + " | ".join(cells) + f" | {conns:g} |")
        lines.append("")
        write = trips[sizes[0]]["write"]
        lines += [f"Statements of body (a), {sizes[0]} tables, one round trip each ({title}):", ""]
        for strategy in ("none", "recipe", "sa_rollback"):
            if strategy in write:
                entry = write[strategy]
                lines.append(f"* {LABELS[strategy]}: " + " → ".join(f"`{s}`" for s in entry["statements"]))
                if entry["max"] != entry["min"]:
                    lines.append(
                        f"  * its costliest test ({entry['max']}): "
                        + " → ".join(f"`{s}`" for s in entry["statements_max"])
                    )
        lines.append("")
    return lines


def _suite_table(results: dict[str, Any]) -> list[str]:
    suites = results.get("suites")
    if not suites:
        return []
    lines = [
        f"### Whole suite: {suites['tests']} tests, {suites['tables']} tables, mean of {suites['reps']} "
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
            f"| {LABELS[key]} | {_ci(serial, False) if serial else '—'} | "
            f"{_ci(d_serial['diff']) if d_serial else '—'} | "
            f"{_ci(n2, False) if n2 else '—'} | {_ci(d_n2['diff']) if d_n2 else '—'} | "
            f"{(format(speed['mean'], '.2f') + 'x') if speed else '—'} |"
        )
    lines.append("")
    return lines


def _hot_path_tables(results: dict[str, Any]) -> list[str]:
    hot = results.get("hot_path")
    if not hot:
        return []
    drivers = list(hot["drivers"])
    header = ["| measurement | " + " | ".join(drivers) + " |", "| --- |" + " ---: |" * len(drivers)]

    def row(label: str, *keys: str, signed: bool = True) -> str:
        cells = []
        for driver in drivers:
            stat = hot["drivers"][driver]
            for key in keys:
                stat = stat[key]
            cells.append(_ci(stat, signed))
        return f"| {label} | " + " | ".join(cells) + " |"

    def counts(label: str, pick: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(pick(hot["drivers"][d]) for d in drivers) + " |"

    variants = ("outside", "in_scope", "before_first_statement")
    checkout = hot["drivers"][drivers[0]]["checkout"]
    lines = [
        "### Hot path: the plugin's own cost",
        "",
        "CPU time of the measuring thread, in µs, from paired blocks: "
        f"{checkout['rounds']} rounds of one block of {checkout['iterations']} iterations of each variant, in "
        "rotating order; a cost is the mean of the differences within a round. Call counts are cProfile's, "
        "exact: function calls (Python and builtin) per iteration.",
        "",
        "#### Per checkout: `engine.connect()` + `close()`",
        "",
        *header,
        row("outside a scope (the listeners return at once)", "checkout", "us", "outside", signed=False),
        row("in a scope, after its first statement", "checkout", "us", "in_scope", signed=False),
        row(
            "in a scope, before its first statement (each checkout checks that the server kept the shared connection)",
            "checkout",
            "us",
            "before_first_statement",
            signed=False,
        ),
        row("**plugin per checkout in a scope** (in a scope - outside)", "checkout", "in_scope", "plugin_us"),
        row(
            "plugin per checkout before the scope's first statement (- outside)",
            "checkout",
            "before_first_statement",
            "plugin_us",
        ),
        row(
            "of which the liveness check (before - after the first statement)",
            "checkout",
            "before_first_statement",
            "liveness_check_us",
        ),
        row("`Driver.dead()` alone, the liveness check's poll (- an empty call)", "liveness", "dead_us"),
        counts(
            "function calls per checkout: outside / in a scope / before the first statement",
            lambda e: " / ".join(f"{e['checkout']['calls'][k]['calls']:g}" for k in variants),
        ),
        counts(
            "of which sa_rollback's own functions",
            lambda e: " / ".join(f"{e['checkout']['calls'][k]['sa_rollback_calls']:g}" for k in variants),
        ),
        "",
        "#### Per statement: `SELECT 1`, one round trip",
        "",
        *header,
        row("through a logical connection's cursor", "statement", "dbapi", "us", "logical", signed=False),
        row(
            "through the shared connection's own cursor, in the same transaction",
            "statement",
            "dbapi",
            "us",
            "physical",
            signed=False,
        ),
        row("**plugin per statement** (logical - shared connection's cursor)", "statement", "dbapi", "plugin_us"),
        row(
            "`LogicalConnection._run` alone, with a statement function that does nothing",
            "statement",
            "run_only",
            "plugin_us",
        ),
        row(
            "`connection.exec_driver_sql()`: in a scope - outside, both in a transaction",
            "statement",
            "sqlalchemy",
            "plugin_us",
        ),
        counts(
            "function calls the logical cursor adds per statement",
            lambda e: f"{e['statement']['dbapi']['extra_calls']:g}",
        ),
        "",
        f"Where the plugin's time goes per checkout in a scope ({drivers[0]}; each of sa_rollback's functions' "
        "own time under cProfile, as a share of the time in all of them):",
        "",
        "| function | calls per checkout | share |",
        "| --- | ---: | ---: |",
    ]
    for fn in checkout["calls"]["in_scope"]["sa_rollback_functions"][:10]:
        lines.append(f"| `{fn['function']}` | {fn['calls']:g} | {fn['share']:.0%} |")
    lines.append("")
    nodb = hot.get("nodb_test")
    if nodb:
        how = " ".join(nodb["pytest_args"]) or "default options"
        hooks = "; ".join(f"`{module}`: {', '.join(names)}" for module, names in nodb["moved_hooks"])
        lines += [
            "#### Per test that touches no database, under pytest",
            "",
            f"One pytest run (`{how}`) of {nodb['tests']} trivial tests. sa_rollback's per-test hooks ({hooks}) "
            "are switched on and off from one test to the next (adjacent tests form a pair, in alternating "
            f"order), and each test's protocol (setup, call, teardown) is timed in CPU time: {nodb['pairs']} pairs.",
            "",
            "| measurement | per test |",
            "| --- | ---: |",
            f"| hooks off: test protocol, µs, without the garbage collector's time | {_ci(nodb['off_us'], False)} |",
            f"| hooks on: test protocol, µs, the same | {_ci(nodb['on_us'], False)} |",
            f"| garbage collector, µs per test, hooks off / on | {_ci(nodb['gc_off_us'], False)} / "
            f"{_ci(nodb['gc_on_us'], False)} |",
            f"| **plugin per test**, µs (on - off, paired) | **{_ci(nodb['plugin_us'])}** |",
            f"| function calls, hooks off / on | {nodb['calls_off']['mean']:g} / {nodb['calls_on']['mean']:g} |",
            f"| of which sa_rollback's own functions | {nodb['plugin_calls']['mean']:g} |",
            "",
        ]
    return lines


def _nodb_table(results: dict[str, Any]) -> list[str]:
    nodb = results.get("nodb", {})
    if not nodb:
        return []
    lines = [
        "### A test that touches no database, whole pytest runs",
        "",
        "| measurement | µs per test |",
        "| --- | ---: |",
    ]
    for key in ("pytest", "pytest_lean"):
        if key not in nodb:
            continue
        p = nodb[key]
        how = f"`{' '.join(p['pytest_args'])}`" if p.get("pytest_args") else "default options"
        lines += [
            f"| pytest ({how}), plugin not loaded: mean test (setup + call + teardown), {p['tests']} tests a run, "
            f"{p['reps']} runs | {_ci(p['plain_us_per_test'], False)} |",
            f'| pytest ({how}), `pytest_plugins = ["sa_rollback"]`: mean test | '
            f"{_ci(p['plugin_us_per_test'], False)} |",
            f"| **plugin overhead per test** ({how}; runs paired, plugin minus plain) | "
            f"**{_ci(p['plugin_overhead_us_per_test'])}** |",
        ]
        if "hooks_us_per_test" in p:
            lines += [
                f"| pytest ({how}), `sa_rollback.plugin` imported, not registered: mean test | "
                f"{_ci(p['imported_us_per_test'], False)} |",
                f"| **the plugin's per-test hooks** ({how}; runs paired, plugin minus imported) | "
                f"**{_ci(p['hooks_us_per_test'])}** |",
            ]
    if "core" in nodb:
        c = nodb["core"]
        lines += [
            f"| core: `with rollback_scope(): pass` | {_ci(c['scope_us'], False)} |",
            f"| core: empty `with` | {_ci(c['empty_with_us'], False)} |",
            f"| **core overhead** (paired) | **{_ci(c['overhead_us'])}** |",
        ]
    lines.append("")
    return lines


def _provisioning(results: dict[str, Any]) -> list[str]:
    prov = results.get("provisioning", {})
    if not prov:
        return []
    lines = [
        "### Provisioning (ms)",
        "",
        "| tables | CREATE DATABASE ... TEMPLATE | DROP DATABASE | CREATE DATABASE (empty) | create_all |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, entry in prov.get("databases", {}).items():
        lines.append(
            f"| {size} | {_ci(entry['clone_from_template_ms'], False)} | "
            f"{_ci(entry['drop_database_ms'], False)} | {_ci(entry['create_empty_database_ms'], False)} | "
            f"{_ci(entry['create_all_ms'], False)} |"
        )
    server = prov.get("embedded_server")
    if server:
        lines.append("")
        if server.get("available"):
            lines.append(
                f"Embedded server (`{server['module']}`): cold start (initdb + start + first query) "
                f"{_ci(server['cold_start_ms'], False)} ms, warm start (existing data directory) "
                f"{_ci(server['warm_start_ms'], False)} ms."
            )
        else:
            lines.append(f"Embedded server not measured: {server.get('reason')}.")
    lines.append("")
    return lines


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
            ys = [max(timing[s][body][key]["ms"]["mean"], 1e-3) for s in sizes]
            ax.bar(xs, ys, width, label=LABELS[key], color=colors[key])
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{s} tables" for s in sizes])
        ax.set_title(f"body {BODY_LABELS[body]}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    grid[0][0].set_ylabel("time per test, ms (mean, log scale)")
    # The transactional strategies' overhead is invisible on the log scale above; this row shows it.
    width = 0.8 / max(len(cheap), 1)
    for ax, body in zip(grid[1], BODIES):
        for i, key in enumerate(cheap):
            xs = [n + (i - (len(cheap) - 1) / 2) * width for n in range(len(sizes))]
            diffs = [timing[s][body][key]["vs_none"]["diff"] for s in sizes]
            ys = [d["mean"] for d in diffs]
            err = [d["ci95"] for d in diffs]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=LABELS[key], color=colors[key])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(0.2, color="grey", linestyle="--", linewidth=0.8, label="target: 0.2 ms")
        ax.set_xticks(range(len(sizes)), [f"{s} tables" for s in sizes])
        ax.grid(axis="y", alpha=0.3)
    grid[1][0].set_ylabel("overhead over no isolation, ms\n(paired mean, bars: 95% CI)")
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


README = Path(__file__).resolve().parent / "README.md"
RESULTS_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
ASYNC_MARKERS = ("<!-- async-results:start -->", "<!-- async-results:end -->")


def update_readme(results_md: Path, readme: Path = README, markers: tuple[str, str] = RESULTS_MARKERS) -> Path:
    """Replace what stands between the README's markers with ``results_md``, its headings one level down."""
    start, end = markers
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = "\n".join("#" + line if line.startswith("#") else line for line in results_md.read_text().splitlines())
    readme.write_text(f"{head}{start}\n{body.strip()}\n{end}{tail}")
    return readme
