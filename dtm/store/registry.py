"""The run registry: one SQLite file under the cache (``registry.sqlite``), its schema
and the statements of its ``artifacts``, ``results`` and ``merges`` tables (the ``jobs``
and ``metrics`` tables are ``dtm.store.jobs``'s)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm.errors import RegistryError
from dtm.store.files import _DONE, cache_dir, canonical_json, input_key, publish_dir

SCHEMA_VERSION = 6  # 2: jobs and metrics tables; 3: results; 4: kinds and clusterings;
# 5: merges (the merges a user tuned or exported, by recipe); 6: jobs.parent (the members
# of a group run)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    kind    TEXT NOT NULL,
    key     TEXT NOT NULL,
    inputs  TEXT NOT NULL,
    meta    TEXT NOT NULL,
    path    TEXT NOT NULL,
    name    TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS artifacts_kind_created ON artifacts (kind, created);
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    grp         TEXT,
    config      TEXT NOT NULL,
    state       TEXT NOT NULL,
    backend     TEXT NOT NULL,
    ref         TEXT,
    pid         INTEGER,
    proc_start  TEXT,
    gpu         INTEGER,
    run_dir     TEXT NOT NULL,
    resume      INTEGER NOT NULL DEFAULT 0,
    step        INTEGER NOT NULL DEFAULT 0,
    first_step  INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    created     REAL NOT NULL,
    started     REAL,
    updated     REAL NOT NULL,
    ended       REAL,
    clustering  TEXT,
    parent      TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    job    TEXT NOT NULL,
    member INTEGER NOT NULL,
    step   INTEGER NOT NULL,
    data   TEXT NOT NULL,
    PRIMARY KEY (job, member, step)
);
CREATE TABLE IF NOT EXISTS results (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    model_key TEXT NOT NULL,
    model     TEXT NOT NULL,
    label     TEXT,
    grp       TEXT,
    task      TEXT NOT NULL,
    metric    TEXT NOT NULL,
    value     REAL,
    stderr    REAL,
    n         INTEGER,
    seed      INTEGER,
    engine    TEXT NOT NULL,
    lim       INTEGER,
    created   REAL NOT NULL,
    kind      TEXT,
    clustering TEXT
);
CREATE TABLE IF NOT EXISTS merges (
    key      TEXT PRIMARY KEY,
    grp      TEXT,
    label    TEXT NOT NULL,
    base     TEXT NOT NULL,
    adapters TEXT NOT NULL,
    recipe   TEXT NOT NULL,
    source   TEXT NOT NULL,
    path     TEXT,
    created  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_model ON results (model_key);
CREATE INDEX IF NOT EXISTS results_grp ON results (grp);
"""
# Schema 4's columns, added in place to an older registry (their rows read NULL).
_ADDED_COLUMNS = (
    ("jobs", "clustering"),
    ("results", "kind"),
    ("results", "clustering"),
    ("jobs", "parent"),
)


def busy_timeout() -> float:
    """Seconds a registry call waits for another process's lock before it gives up with
    a RegistryError: ``$DTM_REGISTRY_TIMEOUT`` (default 30)."""
    raw = os.environ.get("DTM_REGISTRY_TIMEOUT", "30")
    try:
        value = float(raw)
    except ValueError:
        raise RegistryError(f"DTM_REGISTRY_TIMEOUT={raw!r}: not a number of seconds.") from None
    if not 0 <= value <= 86400:
        raise RegistryError(f"DTM_REGISTRY_TIMEOUT={raw!r}: give 0 to 86400 seconds.")
    return value


@dataclass(frozen=True)
class Artifact:
    """One registry row: what was produced (``path``) from what (``inputs``)."""

    kind: str
    key: str
    path: Path
    inputs: dict[str, Any]
    meta: dict[str, Any]
    created: float
    name: str | None = None


class Registry:
    """The SQLite run registry (WAL mode). One short-lived connection per call, so it
    is safe from Streamlit's threads and from several processes at once."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "registry.sqlite"
        with self._connect() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"The registry {self.db_path} was written by a newer version of dtm "
                    f"(schema {version} > {SCHEMA_VERSION}); upgrade dtm or set DTM_CACHE."
                )
            con.executescript(_SCHEMA)
            if version < SCHEMA_VERSION:  # older schemas lack tables and columns made here
                for table, column in _ADDED_COLUMNS:
                    have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside ``BEGIN IMMEDIATE``: one writer at a time across processes,
        so a read-then-write (claim the next queued job) cannot race another."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        wait = busy_timeout()
        try:
            con = sqlite3.connect(self.db_path, timeout=wait, isolation_level=None)
        except sqlite3.Error as e:
            raise RegistryError(f"Cannot open the registry {self.db_path}: {e}") from e
        try:
            con.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            con.execute("PRAGMA journal_mode=WAL")
            yield con
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise RegistryError(
                    f"The registry {self.db_path} is locked by another process ({e}; waited "
                    f"{wait:g} s, DTM_REGISTRY_TIMEOUT); try again when it finishes."
                ) from e
            if "disk" in str(e) and shutil.disk_usage(self.root).free < 1 << 20:
                raise RegistryError(
                    f"The registry {self.db_path} could not be written: the disk is full "
                    f"({e}); nothing was recorded and the registry is unchanged. Free some "
                    "space and run it again."
                ) from e
            raise RegistryError(f"The registry {self.db_path} failed: {e}") from e
        except sqlite3.DatabaseError as e:
            raise RegistryError(
                f"The registry {self.db_path} is not a readable SQLite database ({e}). "
                "It was left as it is: move it aside (or set DTM_CACHE) to start a new one."
            ) from e
        finally:
            con.close()

    def _row_to_artifact(self, row: tuple) -> Artifact:
        kind, key, inputs, meta, path, name, created = row
        return Artifact(
            kind, key, self.root / path, json.loads(inputs), json.loads(meta), created, name
        )

    def get(self, kind: str, key: str) -> Artifact | None:
        """The artifact, or None when absent or when its folder is missing or incomplete."""
        with self._connect() as con:
            row = con.execute(
                "SELECT kind, key, inputs, meta, path, name, created FROM artifacts "
                "WHERE kind = ? AND key = ?",
                (kind, key),
            ).fetchone()
        if row is None:
            return None
        art = self._row_to_artifact(row)
        return art if (art.path / _DONE).exists() else None

    def list(self, kind: str) -> list[Artifact]:
        """Complete artifacts of a kind, newest first."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT kind, key, inputs, meta, path, name, created FROM artifacts "
                "WHERE kind = ? ORDER BY created DESC",
                (kind,),
            ).fetchall()
        arts = [self._row_to_artifact(r) for r in rows]
        return [a for a in arts if (a.path / _DONE).exists()]

    def set_name(self, kind: str, key: str, name: str) -> None:
        with self._connect() as con:
            cur = con.execute(
                "UPDATE artifacts SET name = ? WHERE kind = ? AND key = ?", (name, kind, key)
            )
            if cur.rowcount == 0:
                raise RegistryError(f"No {kind} with key {key} in {self.db_path}.")

    def produce(
        self, kind: str, inputs: dict[str, Any], build: Callable[[Path], dict[str, Any]]
    ) -> tuple[Artifact, bool]:
        """Return ``(artifact, computed)`` for ``(kind, inputs)``, running ``build`` only
        when no complete artifact exists. ``build(folder)`` writes its files into a private
        folder and returns a JSON-serialisable ``meta`` dict; the folder is published by
        one rename, so readers never see a partial artifact."""
        key = input_key(kind, inputs)
        hit = self.get(kind, key)
        if hit is not None:
            return hit, False
        final = self.root / kind / key
        if final.exists() and not (final / _DONE).exists():
            shutil.rmtree(final)  # left by a crash before its rename: never trusted
        meta: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            meta.update(build(tmp))
            (tmp / _DONE).write_text(canonical_json({"kind": kind, "key": key}))

        publish_dir(final, write, replace=False, wrap=False)  # another's copy is equal
        rel = final.relative_to(self.root).as_posix()
        now = time.time()
        with self._connect() as con:
            con.execute(
                "INSERT INTO artifacts (kind, key, inputs, meta, path, name, created) "
                "VALUES (?, ?, ?, ?, ?, NULL, ?) ON CONFLICT(kind, key) DO UPDATE SET "
                "meta = excluded.meta, path = excluded.path, created = excluded.created",
                (kind, key, canonical_json(inputs), canonical_json(meta), rel, now),
            )
        return Artifact(kind, key, final, inputs, meta, now), True

    # --- results: the scores table (``dtm.score`` builds and reads its rows)

    RESULT_COLUMNS = (
        "model_key", "model", "label", "grp", "kind", "clustering", "task", "metric", "value",
        "stderr", "n", "seed", "engine", "lim", "created",
    )  # fmt: skip

    def add_results(self, rows: list[dict[str, Any]]) -> None:
        """Insert score rows (dicts with every ``RESULT_COLUMNS`` name), in one transaction."""
        cols = self.RESULT_COLUMNS
        with self.transaction() as con:
            con.executemany(
                f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [tuple(r[c] for c in cols) for r in rows],
            )

    def results(self, group: str | None = None) -> list[tuple]:
        """Every score row (of one group), oldest first, as ``RESULT_COLUMNS`` tuples."""
        sql = f"SELECT {', '.join(self.RESULT_COLUMNS)} FROM results"
        args: tuple = ()
        if group is not None:
            sql += " WHERE grp = ?"
            args = (group,)
        with self._connect() as con:
            return con.execute(sql + " ORDER BY created", args).fetchall()

    def result_groups(self) -> list[str]:
        """The groups that have scores, newest first."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT grp, MAX(created) AS t FROM results WHERE grp IS NOT NULL GROUP BY grp "
                "ORDER BY t DESC"
            ).fetchall()
        return [r[0] for r in rows]

    # --- merges: the merges a user kept or exported (``dtm.merge.saved``)

    MERGE_COLUMNS = ("key", "label", "base", "adapters", "recipe", "source", "path", "grp")

    def put_merge(self, row: dict[str, Any]) -> None:
        """Insert a merge (``MERGE_COLUMNS``; ``adapters`` and ``recipe`` as JSON text), or
        update its source, and its path and group when given, when its key is there."""
        cols = (*self.MERGE_COLUMNS, "created")
        with self.transaction() as con:
            con.execute(
                f"INSERT INTO merges ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                " ON CONFLICT(key) DO UPDATE SET source = excluded.source,"
                " path = COALESCE(excluded.path, merges.path),"
                " grp = COALESCE(excluded.grp, merges.grp), created = excluded.created",
                (*(row[c] for c in self.MERGE_COLUMNS), time.time()),
            )

    def merges(self) -> list[dict[str, Any]]:
        """Every saved merge, newest first: a dict of ``MERGE_COLUMNS`` (JSON as text)."""
        with self._connect() as con:
            rows = con.execute(
                f"SELECT {', '.join(self.MERGE_COLUMNS)} FROM merges ORDER BY created DESC"
            ).fetchall()
        return [dict(zip(self.MERGE_COLUMNS, r, strict=True)) for r in rows]
