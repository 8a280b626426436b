"""One run's databases: prepare the server and template, provide a clone per process, drop it.

Nothing here knows about pytest: the plugin calls :func:`prepare` once (in the
xdist controller, or the serial process), :func:`provision` in each process
that runs tests, and :func:`teardown` at its end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sqlalchemy.engine import URL, make_url

from ._janitor import Janitor, not_ours
from ._lease import hold, let_go, owner_gone, release_all
from ._listeners import REDIRECT
from ._names import HOSTNAME, Mark, clone_name, extra_name, pid_alive, template_name
from ._schema import SchemaSource, existing, schema_source
from ._server import Server, resolve_server

#: the base database of the embedded server, where no database is configured
EMBEDDED_BASE = "sa_rollback"
#: templates of one base kept on the server (one per schema version: branches whose CI runs at once)
KEEP_TEMPLATES = 3


def ensure_empty_base(janitor: Janitor, base: str) -> None:
    """The embedded server's empty base database, created on first use."""
    with janitor.lock(f"sa_rollback base {base}"):
        if not janitor.exists(base):
            janitor.create(base, Mark("base"))


def ensure_template(
    janitor: Janitor,
    server: Server,
    base: str,
    source: SchemaSource,
    run_id: str,
    rebuild: bool,
    on_build: Optional[Callable[[str, float], None]] = None,
) -> str:
    """Build the template for ``source`` unless an up-to-date one exists. Returns its name."""
    if source.kind == "existing":
        return base
    name = template_name(base, source.fingerprint)
    with janitor.lock(f"sa_rollback template {name}"):
        if janitor.exists(name):
            mark = janitor.mark(name)
            if mark is None:
                raise not_ours(name)
            fresh = mark.kind == "template" and mark.ready
            if fresh and not (rebuild and mark.run != run_id):
                return name
            janitor.drop(name)
        # Templates of the same base built from older versions of the schema.
        prune_templates(janitor, base, name)
        started = time.perf_counter()
        janitor.create(name, Mark.template(base, source.fingerprint, run_id, ready=False))
        try:
            # A build that connects to the configured database by itself (an env.py that reads the
            # app's settings, a hook) reaches the template instead: the configured one is never touched.
            with REDIRECT.routed(server.admin_url, base, name):
                source.build(server.url_for(name))
            # Connections the build left open (an engine env.py never disposed) would block every clone.
            janitor.terminate(name)
        except BaseException:
            janitor.drop(name)
            raise
        janitor.set_mark(name, Mark.template(base, source.fingerprint, run_id, ready=True))
        if on_build is not None:
            on_build(name, time.perf_counter() - started)
    return name


def drop_dead_clones(janitor: Janitor, base: str) -> list[str]:
    """Drop the clones left on the server by runs that are provably gone; their names.

    A run is gone when nobody holds its lease (see :mod:`._lease`), which the
    server answers for runs on any host. Clones are found by their mark,
    whatever their name or base; a clone the role may not drop is left. Marks
    of earlier versions carry no lease: those clones of ``base`` are dropped
    only when their host is this one and their process is gone.
    """
    dropped: list[str] = []
    for name, mark in janitor.marked(ours=f"{base}_sar_"):
        if mark.kind != "clone":
            continue
        if mark.lease is None:
            if not mark.belongs_to(base, name, "_sar_") or mark.host != HOSTNAME:
                continue
            if mark.pid is None or mark.pid == os.getpid() or pid_alive(mark.pid):
                continue
        elif not owner_gone(janitor.conn, mark.lease):
            continue
        lost = False
        try:
            if janitor.drop(name):
                dropped.append(name)
        except Exception:
            # Another run is dropping it too, the role may not, or the server ended the session:
            # sweeping what others left never fails this run.
            lost = janitor.reopen_if_lost()
        if mark.lease is not None and not lost:
            let_go(janitor.conn, mark.lease)
    return dropped


def prune_templates(janitor: Janitor, base: str, current: str, keep: int = KEEP_TEMPLATES) -> list[str]:
    """Drop old templates of ``base`` (other schema versions); their names.

    The newest ``keep`` (``current`` included) stay, and so does any template
    that a session is connected to, or that a live run is still building.
    """
    others = [
        (name, mark)
        for name, mark in janitor.marked(ours=f"{base}_sar_")
        if mark.kind == "template" and name != current and mark.belongs_to(base, name, "_sar_tpl_")
    ]
    others.sort(key=lambda item: item[1].time or 0, reverse=True)
    dropped: list[str] = []
    for name, mark in others[max(keep - 1, 0) :]:
        if mark.lease is not None and not mark.ready:
            if not owner_gone(janitor.conn, mark.lease):
                continue  # a live run is building it
            let_go(janitor.conn, mark.lease)
        if janitor.drop_if_unused(name):
            dropped.append(name)
    return dropped


def drop_run_clones(plan: Plan, run_id: str) -> list[str]:
    """Drop every clone of ``plan``'s base that this run made and left (workers ended early); their names."""
    dropped: list[str] = []
    if plan.template is None:
        return dropped
    with Janitor(plan.server.admin_url) as janitor:
        for name, mark in janitor.marked(ours=f"{plan.base}_sar_"):
            if mark.kind == "clone" and mark.run == run_id and mark.belongs_to(plan.base, name, "_sar_"):
                try:
                    if janitor.drop(name):
                        dropped.append(name)
                except Exception:
                    pass  # still in use, or gone meanwhile: the next run's sweep finds it
    return dropped


@dataclass
class Provisioned:
    """What :func:`provision` set up for this process."""

    server: Server
    url: URL
    database: str
    created: bool
    timings: dict[str, float]
    #: the template it was cloned from (None when the configured database is used as it is)
    template: Optional[str] = None
    #: further empty databases made for this process (see :meth:`extra`)
    extras: list[str] = field(default_factory=list)
    #: the configured (or embedded) database whose clone this is
    base: Optional[str] = None

    def extra(self, suffix: str, run_id: str) -> URL:
        """An empty database of this process's own, named after its main one; dropped with it."""
        name = extra_name(self.database, suffix)
        if name not in self.extras:
            with Janitor(self.server.admin_url) as janitor:
                janitor.replace(name, Mark.clone(self.base or self.database, run_id))
            self.extras.append(name)
        return self.url.set(database=name)

    def url_string(self) -> str:
        return self.url.render_as_string(hide_password=False)

    def owned(self) -> list[str]:
        """The databases of this process that sa_rollback created."""
        return ([self.database] if self.created else []) + self.extras


@dataclass
class Plan:
    """The server, base database and template of a run, before any clone."""

    server: Server
    driver_url: URL
    base: str
    configured: Optional[str]
    template: Optional[str]
    timings: dict[str, float]
    #: what the template's fingerprint was taken of (see SchemaSource.inputs)
    inputs: list[str] = field(default_factory=list)


def prepare(
    url: Optional[str],
    schema: Optional[str],
    server_dir: Path,
    run_id: str,
    parallel: bool,
    rebuild: bool = False,
    on_build: Optional[Callable[[str, float], None]] = None,
    schema_inputs: Sequence[str] = (),
    schema_dir: Optional[Path] = None,
    lease: bool = True,
) -> Plan:
    """Start or find the server and build the template if needed; clone nothing.

    The xdist controller calls this before the workers start, so a failing
    schema build is reported once, and the workers only clone. With ``lease``,
    this process holds the run's lease from here on (see :mod:`._lease`); a
    worker whose controller holds it passes False.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    server, configured = resolve_server(url, server_dir)
    timings["server"] = time.perf_counter() - started
    hint = "--sa-url / SA_ROLLBACK_URL / the sa_rollback_url ini key" if url else "--sa-server-dir"
    with Janitor(server.admin_url, hint) as janitor:
        if lease:
            # Before any database of this run exists: a clone is never without its live lease.
            hold(server.admin_url, run_id)
        source = schema_source(schema, schema_inputs, schema_dir)
        driver_url = make_url(url) if url else server.admin_url
        if configured is None:
            base = EMBEDDED_BASE
            ensure_empty_base(janitor, base)
        else:
            base = configured
        if configured is not None and (source is None or source.kind == "existing"):
            janitor.require(configured, "--sa-schema / SA_ROLLBACK_SCHEMA / the sa_rollback_schema ini key")
        if source is None and configured is not None and not parallel:
            # A configured database, no schema to build, one process: use it as it is.
            return Plan(server, driver_url, base, configured, None, timings)
        started = time.perf_counter()
        template = ensure_template(janitor, server, base, source or existing(), run_id, rebuild, on_build)
        timings["template"] = time.perf_counter() - started
    return Plan(server, driver_url, base, configured, template, timings, source.inputs if source else [])


def provision(plan: Plan, run_id: str, worker: str, notice: Optional[Callable[[str], None]] = None) -> Provisioned:
    """Provide this process's test database from the plan that :func:`prepare` made.

    ``notice`` is told when the clone has to wait for other sessions to leave the template.
    """
    server = plan.server
    timings = dict(plan.timings)
    if plan.template is None:
        return Provisioned(server, plan.driver_url.set(database=plan.base), plan.base, False, timings)
    database = clone_name(plan.base, run_id, worker)
    with Janitor(server.admin_url, notice=notice) as janitor:
        drop_dead_clones(janitor, plan.base)
        started = time.perf_counter()
        janitor.replace(database, Mark.clone(plan.base, run_id), template=plan.template)
        timings["clone"] = time.perf_counter() - started
    if plan.configured is not None:
        REDIRECT.add(plan.driver_url, plan.configured, database)
    url = plan.driver_url.set(database=database)
    return Provisioned(server, url, database, True, timings, plan.template, base=plan.base)


def teardown(provisioned: Provisioned) -> None:
    """Drop this process's clone, let go of the run's lease, and leave the embedded server.

    The embedded server stops here if this process was its last: an xdist
    worker may be ended without running ``atexit``, and the server would then
    be left to the watchdog.
    """
    REDIRECT.clear()
    try:
        owned = provisioned.owned()
        if owned:
            with Janitor(provisioned.server.admin_url) as janitor:
                for name in owned:
                    janitor.drop(name)
    finally:
        release_all()
        if provisioned.server.embedded is not None:
            provisioned.server.embedded.leave()
