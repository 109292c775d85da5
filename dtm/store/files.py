"""Files under the cache: the cache folder, content keys, atomic writes and the one
folder publisher, progress files, process checks, metrics files and uploads.

Every pipeline step is a function of its inputs. Its output is one registry row,
keyed by a hash of those inputs, plus a folder of files ``<cache>/<kind>/<key>/``.
A folder becomes visible only by an atomic rename once every file in it is
written, so a crash never leaves a half-written artifact that a later read trusts.
``DTM_CACHE`` moves the cache (default: ``cache/`` beside the ``dtm`` package).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dtm.errors import DTMError, RegistryError, StorageError

_DONE = "_complete.json"  # written last inside an artifact folder


def cache_dir() -> Path:
    """The cache root: ``$DTM_CACHE`` or ``cache/`` at the project root."""
    env = os.environ.get("DTM_CACHE")
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "cache"
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
