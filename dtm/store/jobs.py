"""The registry's ``jobs`` and ``metrics`` tables: a training job's row (``Job``) and
every statement on them (``JobStore``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm.errors import ConfigError
from dtm.store.registry import Registry

ACTIVE = ("starting", "running", "stopping")
RESTARTABLE = ("failed", "cancelled", "interrupted")
FINAL = ("done", *RESTARTABLE)
_COLUMNS = (
    "id, kind, name, grp, config, state, backend, ref, pid, proc_start, gpu, run_dir, resume, "
    "step, first_step, total_steps, attempts, error, created, started, updated, ended, clustering, "
    "parent"
)


def place(
    rows: list[tuple], limit: int, gpus: int, per_gpu: int = 1
) -> list[tuple[str, int | None]]:
    """The queue's placement rule: which queued jobs start now, and on which GPU.

    ``rows``: ``(id, backend, state, gpu)`` of the open top-level jobs, oldest first.
    Every queued Ray job starts (Ray places it). A queued local job starts while fewer
    than ``limit`` local jobs are active; with ``gpus`` GPUs it goes to the GPU with the
    fewest active jobs of this queue (the lowest index among equals) and waits while
    every GPU has ``per_gpu`` of them. Returns ``(id, gpu index or None)``, oldest first.
    """
    active = [r for r in rows if r[1] == "local" and r[2] != "queued"]
    load = [sum(r[3] == g for r in active) for g in range(gpus)]
    free = limit - len(active)
    out: list[tuple[str, int | None]] = []
    for jid, backend, state, _ in rows:
        if state != "queued":
            continue
        gpu = None
        if backend == "local":
            if free <= 0:
                continue
            if gpus:
                gpu = min(range(gpus), key=lambda g: (load[g], g))
                if load[gpu] >= per_gpu:
                    continue
                load[gpu] += 1
            free -= 1
        out.append((jid, gpu))
    return out


@dataclass
class Job:
    id: str
    kind: str
    name: str
    group: str | None
    config: dict[str, Any]
    state: str
    backend: str
    ref: str | None
    pid: int | None
    proc_start: str | None
    gpu: int | None
    run_dir: Path
    resume: bool
    step: int
    first_step: int
    total_steps: int | None
    attempts: int
    error: str | None
    created: float
    started: float | None
    updated: float
    ended: float | None
    clustering: str | None = None  # a sub-model's clustering (e.g. "kmeans"), set at submit
    parent: str | None = None  # the group job a member row belongs to

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.txt"

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Remaining seconds at the pace since this attempt started; None when unknown."""
        if self.state != "running" or not self.started or not self.step or not self.total_steps:
            return None
        elapsed = (now or time.time()) - self.started
        done_here = self.step - self.first_step  # steps made by this attempt
        if done_here <= 0:
            return None
        return elapsed / done_here * (self.total_steps - self.step)


class JobStore:
    """The ``jobs`` and ``metrics`` tables of a registry."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()

    def _job(self, row: tuple) -> Job:
        r = list(row)
        r[4] = json.loads(r[4])
        r[11] = self.registry.root / r[11] if not os.path.isabs(r[11]) else Path(r[11])
        r[12] = bool(r[12])
        return Job(*r)

    def add(self, job: Job) -> tuple[Job, bool]:
        """Insert ``job`` unless a job with its id exists; returns (the job, inserted)."""
        with self.registry.transaction() as con:
            row = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is not None:
                return self._job(row), False
            con.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 24)})",
                (
                    job.id,
                    job.kind,
                    job.name,
                    job.group,
                    json.dumps(job.config),
                    job.state,
                    job.backend,
                    job.ref,
                    job.pid,
                    job.proc_start,
                    job.gpu,
                    str(job.run_dir),
                    int(job.resume),
                    job.step,
                    job.first_step,
                    job.total_steps,
                    job.attempts,
                    job.error,
                    job.created,
                    job.started,
                    job.updated,
                    job.ended,
                    job.clustering,
                    job.parent,
                ),
            )
        return job, True

    def get(self, job_id: str) -> Job:
        with self.registry._connect() as con:
            row = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:  # a unique prefix is enough, as with git
                rows = con.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE id LIKE ?", (job_id + "%",)
                ).fetchall()
                if len(rows) == 1:
                    row = rows[0]
        if row is None:
            raise ConfigError(f"no job {job_id!r} in {self.registry.db_path}.")
        return self._job(row)

    def list(
        self,
        group: str | None = None,
        states: tuple[str, ...] | None = None,
        parent: str | None = None,
    ) -> list[Job]:
        sql, params = f"SELECT {_COLUMNS} FROM jobs", []
        where = []
        if parent is not None:
            where.append("parent = ?")
            params.append(parent)
        if group is not None:
            where.append("grp = ?")
            params.append(group)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.registry._connect() as con:
            rows = con.execute(sql + " ORDER BY created, id", params).fetchall()
        return [self._job(r) for r in rows]

    def update(self, job_id: str, only_if: tuple[str, ...] | None = None, **fields) -> bool:
        """Set ``fields``; with ``only_if``, only while the state is one of those (an
        atomic compare-and-set). Returns whether a row changed."""
        fields["updated"] = time.time()
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"])
        if "group" in fields:
            fields["grp"] = fields.pop("group")
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql, params = f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id]
        if only_if:
            sql += f" AND state IN ({', '.join('?' * len(only_if))})"
            params += list(only_if)
        with self.registry._connect() as con:
            return con.execute(sql, params).rowcount > 0

    def claim_queued(self, limit: int, gpus: int, per_gpu: int = 1) -> list[str]:
        """In one transaction, mark ``starting`` the queued top-level jobs that have a
        slot (``place``: every Ray job; local jobs while fewer than ``limit`` run, each
        given a GPU index when there are ``gpus``) and record each one's GPU. Returns
        their ids, oldest first; two processes never claim the same job or more jobs
        than there are slots."""
        with self.registry.transaction() as con:
            rows = con.execute(
                "SELECT id, backend, state, gpu FROM jobs WHERE parent IS NULL AND state IN "
                "('queued', 'starting', 'running', 'stopping') ORDER BY created, id"
            ).fetchall()
            claimed = place(rows, limit, gpus, per_gpu)
            for jid, gpu in claimed:
                con.execute(
                    "UPDATE jobs SET state = 'starting', gpu = ?, pid = NULL, updated = ? "
                    "WHERE id = ?",
                    (gpu, time.time(), jid),
                )
        return [jid for jid, _ in claimed]

    def log_metrics(self, job_id: str, rec: dict) -> None:
        """Store one metrics record; records after it (from an attempt that a resume or
        retry replaced) are dropped."""
        member, step = int(rec.get("member", 0)), int(rec["step"])
        with self.registry.transaction() as con:
            con.execute(
                "DELETE FROM metrics WHERE job = ? AND (member > ? OR (member = ? AND step > ?))",
                (job_id, member, member, step),
            )
            con.execute(
                "INSERT OR REPLACE INTO metrics (job, member, step, data) VALUES (?, ?, ?, ?)",
                (job_id, member, step, json.dumps(rec)),
            )

    def metrics(self, job_id: str) -> list[dict]:
        with self.registry._connect() as con:
            rows = con.execute(
                "SELECT data FROM metrics WHERE job = ? ORDER BY member, step", (job_id,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]
