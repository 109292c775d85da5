"""The run registry (one SQLite file under the cache) and atomic artifact writes.

Every pipeline step is a function of its inputs. Its output is one registry row,
keyed by a hash of those inputs, plus a folder of files ``<cache>/<kind>/<key>/``.
A folder becomes visible only by an atomic rename once every file in it is
written, so a crash never leaves a half-written artifact that a later read trusts.
``DTM_CACHE`` moves the cache (default: ``cache/`` beside the ``dtm`` package).

Length: every write the project makes goes through the few helpers here (atomic files,
the folder publisher, progress files, the registry), so that one copy of each exists, and
this is the one module that runs SQL: each registry table's statements are ``Registry``
methods here (artifacts; results: ``add_results``, ``results``, ``result_groups``;
merges: ``put_merge``, ``merges``), so the schema and every query of it are read together.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm.errors import RegistryError, StorageError

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
_DONE = "_complete.json"  # written last inside an artifact folder


def cache_dir() -> Path:
    """The cache root: ``$DTM_CACHE`` or ``cache/`` at the project root."""
    env = os.environ.get("DTM_CACHE")
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def input_key(kind: str, inputs: dict[str, Any]) -> str:
    """A 20-hex-digit key for (kind, inputs); inputs must be JSON-serialisable."""
    return hashlib.sha256(f"{kind}\n{canonical_json(inputs)}".encode()).hexdigest()[:20]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file size limit was reached",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def save_failed(target: Path, e: OSError, existed: bool) -> StorageError | None:
    """The StorageError for a save of ``target`` that failed with ``e`` for lack of room
    or permission (None for any other OSError)."""
    why = _NO_ROOM.get(e.errno)
    if why is None:
        return None
    kept = f"the previous {target.name} is unchanged" if existed else "nothing was written"
    return StorageError(f"could not save {target}: {why} ({e.strerror}); {kept}.")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it over
    ``target``. On any error the temporary file is removed and ``target`` is untouched
    (a full disk or a quota is a StorageError saying so)."""
    target = Path(target)
    existed = target.exists()
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise (save_failed(target, e, existed) or e) from e
    finally:
        if tmp.exists():
            tmp.unlink()


def is_io_error(e: BaseException | None) -> bool:
    """An OSError, or a library error wrapping one (safetensors reports a failed write as
    ``SafetensorError: ... I/O error``)."""
    while e is not None:
        if isinstance(e, OSError) or "I/O error" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def publish_dir(
    final: str | Path, write: Callable[[Path], Any], *, replace: bool = True, wrap: bool = True
) -> Path:
    """The one publisher of folders: call ``write(tmp)`` on a private folder beside
    ``final``, then rename it into place. On failure nothing named ``final`` is created;
    an older ``final`` is replaced only once the new one is complete, or, with
    ``replace=False``, kept (another writer published the same thing first). Single
    files go through ``atomic_path``; registry artifacts through ``Registry.produce``,
    which calls this. A save that fails for lack of room is a StorageError saying so;
    any other I/O error is one too, unless ``wrap=False`` (then it is raised as it is)."""
    from dtm.errors import DTMError

    final = Path(final)
    existed = final.exists()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists() and not replace:
            return final
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except DTMError:  # the writer's own clear message (e.g. a missing input file)
        raise
    except OSError as e:
        no_room = save_failed(final, e, existed)
        if no_room is None and not wrap:
            raise
        raise (no_room or StorageError(f"could not save {final}: {e}")) from e
    except Exception as e:  # e.g. a safetensors write error wrapping an OSError
        if not (wrap and is_io_error(e)):
            raise
        raise StorageError(f"could not save {final}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json_atomic(target: str | Path, obj: Any) -> Path:
    return write_text_atomic(target, json.dumps(obj, indent=2, default=str) + "\n")


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone
    or a zombie: with the pid it identifies one process for the life of the machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    return None if fields[0] == "Z" else fields[19]


def pid_alive(pid: int | None, start: str | None = None) -> bool:
    """The one process check: ``pid`` runs (not a zombie) and, when ``start`` is given,
    is still the process that had that start time (a reused pid is not alive)."""
    if not pid or int(pid) <= 0:
        return False
    now = proc_start_time(int(pid))
    return now is not None and (start is None or now == start)


class ProgressFile:
    """The one progress writer: ``update(**fields)`` merges ``fields`` into a JSON file
    (atomically, at most every ``every`` seconds unless ``force``), so another process
    (a page, ``dtm jobs``) can follow long work."""

    def __init__(self, path: str | Path, every: float = 0.5, **initial: Any) -> None:
        self.path, self.every, self.state, self._last = Path(path), every, dict(initial), 0.0

    def update(self, *, force: bool = False, **fields: Any) -> None:
        self.state.update(fields)
        now = time.time()
        if force or now - self._last >= self.every:
            self._last = now
            write_json_atomic(self.path, {**self.state, "updated": now})


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed writer) is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, max_len: int = 80) -> str:
    """A file name made of letters, digits, '.', '_' and '-' only, never '.' or '..'
    nor hidden: a user-given name can never point outside its folder."""
    base = _UNSAFE.sub("_", Path(str(name).replace("\\", "/")).name).strip("._") or "file"
    return base[-max_len:]


def save_upload(name: str, content: bytes, max_bytes: int = 500 << 20) -> Path:
    """Keep an uploaded file under ``<cache>/uploads/<hash>/<safe name>`` (never overwrites
    a different file: the folder is the content hash)."""
    if len(content) > max_bytes:
        raise RegistryError(
            f"{name}: {len(content) / 2**20:.0f} MiB is over the upload "
            f"limit of {max_bytes / 2**20:.0f} MiB."
        )
    digest = hashlib.sha256(content).hexdigest()[:16]
    target = cache_dir() / "uploads" / digest / safe_name(name)
    if not target.exists():
        with atomic_path(target) as tmp:
            tmp.write_bytes(content)
    return target


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
