"""The train stage: DPO with TRL on an iteration's preference pairs, M_{i-1} -> M_i.

Full fine-tuning or LoRA (peft) of a causal LM checkpoint (`ModelRef`, safetensors only) with
TRL's `DPOTrainer` (sigmoid loss), reference model = the base checkpoint M_{i-1} itself (its
log-probabilities optionally precomputed once, TRL's `precompute_ref_log_probs`), on CPU (fp32) or
CUDA GPUs (bf16 autocast), in this process or in several processes under `accelerate launch`. The
trained model is written with `metareward.checkpoints.save_checkpoint` (manifest + sha256) to
`output_uri`.

The modules, one concern each (the names callers use are re-exported here):
- `config`: `TrainingConfig`, `LoraSettings`, `resolve_precision`.
- `examples`: the pairs table, the input rules and the judge-pair mix: `check_pairs`,
  `prepare_examples` and `select_mix` (pure: pairs -> TRL examples + counts), `NoTrainablePairs`.
- `dpo`: `build_dpo_config` (TrainingConfig -> DPOConfig), the peft config, the adapter merge.
- `resume`: trainer checkpoints uploaded to the run's storage and resumed from.
- `job`: `TrainJob`, `run_job` (the trainer run on a `TrainJob`, in this process, in each rank of
  the child or in each Ray Train worker; writes local folders), `save_outputs` (the trained
  folders -> checkpoints).
- `accelerate_launch`: `run_child`, N processes under `accelerate launch` in a child process group.
- `ray_train`: `run_ray_train` (the driver side of Ray Train) and its checks.
- `worker`: one rank of the child (`python -m metareward.training.worker`) or one Ray Train worker;
  not imported here, the ranks and Ray import it.
- `rewards`: `completion_logps`, `implicit_reward_margins`.
- `stage`: `train_dpo` (materialize, prepare, mix, resume, run, save, report), `TrainResult`.

torch, transformers, datasets and trl are imported lazily: importing this package is cheap.
"""

from metareward.training.accelerate_launch import accelerate_config_file, launch_command, run_child
from metareward.training.config import LoraSettings, TrainingConfig, resolve_precision
from metareward.training.examples import DROP_REASONS, NoTrainablePairs, check_pairs, prepare_examples, select_mix
from metareward.training.job import TrainJob, run_job
from metareward.training.ray_train import check_ray_train_locations, check_worker_resources, ray_train_precision, require_ray_train
from metareward.training.resume import STATE_COMPLETE_MARKER
from metareward.training.rewards import completion_logps, implicit_reward_margins
from metareward.training.stage import TrainResult, train_dpo

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
