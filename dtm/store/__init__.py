"""Everything the project writes, and the only SQL: files under the cache (``files``:
atomic writes, the one folder publisher, progress files, process checks), the run
registry (``registry``: artifacts, results, merges) and its jobs tables (``jobs``)."""

from dtm.store.files import (
    ProgressFile,
    atomic_path,
    cache_dir,
    canonical_json,
    file_digest,
    input_key,
    is_io_error,
    pid_alive,
    proc_start_time,
    publish_dir,
    read_metrics,
    safe_name,
    save_failed,
    save_upload,
    write_json_atomic,
    write_text_atomic,
)
from dtm.store.registry import SCHEMA_VERSION, Artifact, Registry, busy_timeout

__all__ = [
    "SCHEMA_VERSION",
    "Artifact",
    "ProgressFile",
    "Registry",
    "atomic_path",
    "busy_timeout",
    "cache_dir",
    "canonical_json",
    "file_digest",
    "input_key",
    "is_io_error",
    "pid_alive",
    "proc_start_time",
    "publish_dir",
    "read_metrics",
    "safe_name",
    "save_failed",
    "save_upload",
    "write_json_atomic",
    "write_text_atomic",
]
