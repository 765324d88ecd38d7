"""The train stage (`metareward.training.job` for now; split into modules of one concern next).

`metareward.training.worker` is one rank of a multi-process run and is not imported here: it runs
as `python -m metareward.training.worker`.
"""

from metareward.training.job import (
    DROP_REASONS,
    STATE_COMPLETE_MARKER,
    LoraSettings,
    NoTrainablePairs,
    TrainingConfig,
    TrainJob,
    TrainResult,
    accelerate_config_file,
    check_pairs,
    check_ray_train_locations,
    check_worker_resources,
    completion_logps,
    implicit_reward_margins,
    launch_command,
    prepare_examples,
    ray_train_precision,
    require_ray_train,
    resolve_precision,
    run_child,
    run_job,
    select_mix,
    train_dpo,
)

__all__ = [
    "DROP_REASONS",
    "STATE_COMPLETE_MARKER",
    "LoraSettings",
    "NoTrainablePairs",
    "TrainJob",
    "TrainResult",
    "TrainingConfig",
    "accelerate_config_file",
    "check_pairs",
    "check_ray_train_locations",
    "check_worker_resources",
    "completion_logps",
    "implicit_reward_margins",
    "launch_command",
    "prepare_examples",
    "ray_train_precision",
    "require_ray_train",
    "resolve_precision",
    "run_child",
    "run_job",
    "select_mix",
    "train_dpo",
]
