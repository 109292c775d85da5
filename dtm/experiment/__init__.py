"""A whole DTM experiment, headless (``python -m dtm run FILE.yaml``), in four steps:

- ``config``: the YAML file -> a validated ``Experiment`` (every error before any work);
- ``plan``: its training jobs, the one sub-model budget function, the compute estimate;
- ``run``: the five stages (lab, disperse, train, merge, evaluate) with ``status.json``
  progress, and the background launch of the Home page;
- ``report``: which models are scored, ``jobs.md`` and ``results.md``.
"""

from dtm.experiment.config import (
    Experiment,
    experiment_dir,
    load_experiment,
    resolve_inputs,
    story_for_lab,
)
from dtm.experiment.fit import DEFAULT_GPU_GIB, memory_lines
from dtm.experiment.plan import (
    PlannedJob,
    count_rows,
    describe,
    dtm_set,
    estimate,
    plan,
    sub_model_steps,
    together_members,
)
from dtm.experiment.report import experiment_models, results_markdown
from dtm.experiment.run import launch, run_experiment
from dtm.experiment.status import STAGES, Progress, read_status

__all__ = [
    "STAGES",
    "Experiment",
    "PlannedJob",
    "Progress",
    "count_rows",
    "DEFAULT_GPU_GIB",
    "describe",
    "memory_lines",
    "dtm_set",
    "estimate",
    "experiment_dir",
    "experiment_models",
    "launch",
    "load_experiment",
    "plan",
    "read_status",
    "resolve_inputs",
    "results_markdown",
    "run_experiment",
    "story_for_lab",
    "sub_model_steps",
    "together_members",
]
