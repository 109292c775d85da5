"""The Ray backend: jobs go to a Ray cluster through the Ray Jobs API.

Each job is one Ray job whose entrypoint is ``python -m dtm train --job ID`` with
``entrypoint_num_gpus`` GPUs (``DTM_RAY_GPUS``, default 1 when the cluster has GPUs, else
0), so K sub-models train in parallel across the cluster's GPUs; Ray's scheduler queues
what does not fit. Status, logs and cancel go through the same API (a stop sends SIGTERM:
the trainer saves a checkpoint; Ray kills the process if it takes longer than
``DTM_RAY_STOP_WAIT_S``, default 120 s). A job still waiting for resources is marked
cancelled at once; Ray's stop does not reach it, so if Ray starts it later the job
process sees the cancellation and exits without training.

Where artifacts live: the job writes its run folder and its registry rows under
``DTM_CACHE``, which it receives from the submitting side. That path, and this project
(``PYTHONPATH``), must be the same on every node and on the dashboard's machine: a
shared file system (NFS or similar, with working POSIX locks for SQLite) mounted at the
same path, and the same Python environment (``DTM_RAY_PYTHON``; by default the
submitting side's interpreter path, so install the environment at the same path).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

from dtm.errors import ConfigError
from dtm.jobs.base import ACTIVE, Job, JobStore
from dtm.jobs.local import PROJECT_ROOT

# Ray job status -> our state, for jobs that ended without recording it themselves.
_END = {"SUCCEEDED": "done", "FAILED": "failed", "STOPPED": "cancelled"}


class RayBackend:
    name = "ray"

    def __init__(self, address: str) -> None:
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:
            raise ConfigError("the Ray backend needs `pip install 'ray[default]'`.") from e
        self.address = address if "://" in address else f"http://{address}"
        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as e:  # ConnectionError, or Ray's own errors
            raise ConfigError(f"cannot reach the Ray cluster at {self.address}: {e}") from e

    def _gpus(self) -> float:
        if "DTM_RAY_GPUS" in os.environ:
            return float(os.environ["DTM_RAY_GPUS"])
        try:
            import requests

            nodes = requests.get(f"{self.address}/api/v0/nodes", timeout=5).json()
            has_gpu = any(
                n.get("resources_total", {}).get("GPU") for n in nodes["data"]["result"]["result"]
            )
        except Exception:
            has_gpu = False
        return 1.0 if has_gpu else 0.0

    def start(self, store: JobStore, job: Job) -> None:
        python = os.environ.get("DTM_RAY_PYTHON", sys.executable)
        entry = f"{python} -m dtm train --job {job.id}" + (" --resume" if job.resume else "")
        sub_id = f"dtm-{job.id}-{job.attempts}-{uuid.uuid4().hex[:6]}"  # unique per cluster
        self.client.submit_job(
            entrypoint=entry,
            submission_id=sub_id,
            entrypoint_num_gpus=self._gpus(),
            entrypoint_num_cpus=1,
            runtime_env={
                "env_vars": {
                    "DTM_CACHE": str(store.registry.root),
                    "PYTHONPATH": str(PROJECT_ROOT),
                    # the grace between Ray's SIGTERM and SIGKILL: room to save a checkpoint
                    "RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("DTM_RAY_STOP_WAIT_S", "120"),
                }
            },
            metadata={"dtm_job": job.id, "name": job.name},
        )
        store.update(job.id, ref=sub_id)

    def refresh(self, store: JobStore, jobs: list[Job]) -> None:
        for job in jobs:
            if job.ref is None or job.state not in ("queued", *ACTIVE):
                continue
            info = self.client.get_job_info(job.ref)
            status = str(getattr(info.status, "value", info.status))
            if status in _END:
                # The job records its own end; this covers a process killed before it could.
                state = _END[status]
                if job.state == "stopping" and state == "failed":
                    state = "cancelled"
                err = info.message if state == "failed" else None
                store.update(
                    job.id, only_if=(job.state,), state=state, error=err, ended=time.time()
                )
            elif status == "PENDING" and job.state == "starting":
                store.update(job.id, only_if=("starting",), error="waiting for Ray resources")

    def cancel(self, store: JobStore, job: Job) -> None:
        pending = job.ref is None or str(self.client.get_job_status(job.ref)) in (
            "PENDING",
            "JobStatus.PENDING",
        )
        store.update(
            job.id,
            only_if=ACTIVE,
            state="cancelled" if pending else "stopping",
            ended=time.time() if pending else None,
        )
        if job.ref:
            self.client.stop_job(job.ref)

    def logs(self, job: Job, tail: int) -> str:
        if not job.ref:
            return ""
        try:
            return self.client.get_job_logs(job.ref)[-tail:]
        except Exception as e:
            return f"(logs unavailable from {self.address}: {e})"
