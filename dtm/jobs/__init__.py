"""Training runs as background jobs: submit, watch, cancel, resume, retry.

Training never runs in the dashboard's process. ``submit`` records a job in the registry
and hands it to a backend: ``local`` (detached processes on this machine, the default)
or ``ray`` (the Ray Jobs API; chosen with ``DTM_RAY_ADDRESS`` or ``backend="ray:ADDRESS"``).
The job process itself (``python -m dtm train --job ID``, see ``run_job``) records its
progress, metrics and end state, so any process that reads the registry (a restarted
server, a second browser, ``dtm jobs list``) sees the same jobs.
"""

from dtm.jobs.base import ACTIVE, FINAL, RESTARTABLE, Job, JobStore
from dtm.jobs.process import run_job
from dtm.jobs.queue import (
    backend_for,
    cancel,
    default_backend,
    pump,
    refresh,
    restart,
    submit,
    submit_group,
    submit_together,
)

__all__ = [
    "ACTIVE",
    "FINAL",
    "RESTARTABLE",
    "Job",
    "JobStore",
    "backend_for",
    "cancel",
    "default_backend",
    "pump",
    "refresh",
    "restart",
    "run_job",
    "submit",
    "submit_group",
    "submit_together",
]
