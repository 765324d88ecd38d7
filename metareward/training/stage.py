"""`train_dpo`, the train stage's function: check the pairs, materialize the base, prepare and mix
the examples, find a trainer checkpoint to resume from, run (in this process, under `accelerate
launch` or on Ray Train), save M_i, and report it as a `TrainResult`."""

from __future__ import annotations

import importlib.metadata
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from metareward.checkpoints import ModelRef, materialize
from metareward.checkpoints.ref import filesystem_and_path
from metareward.schema import KIND, KIND_ACTOR, KIND_JUDGE
from metareward.training.accelerate_launch import run_child
from metareward.training.config import TrainingConfig, resolve_precision
from metareward.training.examples import NoTrainablePairs, check_pairs, prepare_examples, select_mix
from metareward.training.job import local_job, run_job, save_outputs
from metareward.training.ray_train import (
    RayTrainSpec,
    check_ray_train_locations,
    ray_train_precision,
    require_ray_train,
    run_ray_train,
)
from metareward.training.resume import _checkpoint_step, _find_resume, _job_fingerprint
from metareward.training.scratch import scratch_folder

if TYPE_CHECKING:
    import fsspec

    from metareward.execution import RayExecutionConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    model: the new checkpoint M_i (manifest + sha256 written by `save_checkpoint`).
    metrics: one row per logging step as TRL logs it: step, epoch, loss, grad_norm,
        learning_rate, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
        logps/chosen, logps/rejected, logits/chosen, logits/rejected, entropy, num_tokens,
        mean_token_accuracy. Rewards are the DPO implicit rewards beta * (log pi - log pi_ref)
        of the batch, measured before that step's update.
    n_pairs_used / n_pairs_used_by_kind: pairs trained on (per kind 'actor' / 'judge').
    n_pairs_dropped: pairs left out, by reason (every reason of `DROP_REASONS`, 0 when none).
    n_pairs_truncated: pairs kept with their completions cut to `max_length`.
    n_steps: optimizer steps run (the trainer's global step, counting those before a resume).
    precision: the precision used ('bf16' or 'fp32').
    mixing: the counts of `select_mix` (trainable and used pairs per kind, judge pairs left out).
    adapter: the LoRA adapter checkpoint (None for full fine-tuning).
    resumed_from_step: the trainer checkpoint's step this run resumed from (0: from the start).
    num_processes: training processes (accelerate ranks or Ray Train workers) as the trainer counted
        them (its world size; 1: in this process).
    train_seconds: wall time of `trainer.train()` (loading and saving excluded).
    """

    model: ModelRef
    metrics: pd.DataFrame
    n_pairs_used: int
    n_pairs_used_by_kind: dict[str, int]
    n_pairs_dropped: dict[str, int]
    n_pairs_truncated: int
    n_steps: int
    precision: str
    mixing: dict[str, int]
    adapter: ModelRef | None
    resumed_from_step: int
    num_processes: int
    train_seconds: float = field(compare=False)


def metrics_table(log_history: list[dict[str, float]]) -> pd.DataFrame:
    """One row per logging step (the entries of TRL's log history that carry a `loss`), `step` first."""
    rows = [entry for entry in log_history if "loss" in entry]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64")})
    table["step"] = table["step"].astype("int64")
    return table[["step"] + [column for column in table.columns if column != "step"]]


def _sibling_uri(uri: str, name: str) -> str:
    return f"{uri.rstrip('/').rsplit('/', 1)[0]}/{name}"


def train_dpo(
    pairs: pd.DataFrame,
    base: ModelRef,
    output_uri: str,
    config: TrainingConfig,
    fs: fsspec.AbstractFileSystem | None = None,
    work_dir: str | Path | None = None,
    adapter_uri: str | None = None,
    state_uri: str | None = None,
    callbacks: list[Any] | None = None,
    ray: RayExecutionConfig | None = None,
) -> TrainResult:
    """Train M_i from `base` (M_{i-1}, also the DPO reference) on `pairs` and save it at `output_uri`.

    `fs` reaches the base, the outputs and the state (an fsspec filesystem with endpoint and
    credentials; default: from the URLs). `work_dir` holds the trainer's scratch files (default:
    a temporary folder removed afterwards; accelerate only). With `config.lora`, the adapter is
    saved at `adapter_uri` (default: the folder `adapter` beside `output_uri`). With
    `config.save_steps`, trainer checkpoints go to `state_uri` (None: not kept) and a re-run resumes
    from the newest; the state is removed once M_i is saved. `callbacks`: extra TrainerCallbacks
    (one process only). `ray`: the cluster of `launcher: ray_train` (None: `local`, Ray on this
    machine). Raises `ValueError` for bad or empty pairs (see `metareward.training.examples`),
    `CheckpointError` for a base that does not verify, `ExecutionError` for a Ray Train run that
    cannot work here.
    """
    from transformers import AutoTokenizer

    if output_uri.rstrip("/") == base.uri.rstrip("/"):
        raise ValueError(f"output_uri {output_uri!r} is the base checkpoint's location; the new model needs its own")
    on_ray = config.launcher == "ray_train"
    if callbacks and (config.num_processes > 1 or on_ray):
        raise ValueError("callbacks run in this process only; they need training.num_processes 1 and launcher 'accelerate'")
    if work_dir is not None and on_ray:
        raise ValueError("work_dir is a folder of this machine; Ray Train workers use a scratch folder of their own node")
    adapter_uri = adapter_uri or _sibling_uri(output_uri, "adapter")
    keep_state = bool(state_uri and config.save_steps)
    if on_ray:
        from metareward.execution import RayExecutionConfig

        ray = ray if ray is not None else RayExecutionConfig()
        require_ray_train()
        check_ray_train_locations(
            ray,
            {
                "output_uri": output_uri,
                "adapter_uri": adapter_uri if config.lora is not None else None,
                "state_uri": state_uri if keep_state else None,
            },
        )
    check_pairs(pairs)
    base_dir = materialize(base, fs)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    prepared = prepare_examples(pairs, tokenizer, config)
    if not prepared.examples:
        raise NoTrainablePairs(len(pairs), prepared.n_dropped)
    kept, mixing = select_mix(
        [example[KIND] for example in prepared.examples], config.max_judge_pairs, config.judge_pairs_ratio, config.seed
    )
    examples = [prepared.examples[position] for position in kept]
    used_by_kind = {KIND_ACTOR: mixing["actor_used"], KIND_JUDGE: mixing["judge_used"]}
    if on_ray:
        precision = ray_train_precision(config.precision, ray.gpus_per_engine > 0)
    else:
        precision = resolve_precision(config.precision)
    logger.info(
        "DPO on %d pairs (%s) from %s, %s, %d process(es) (%s); dropped %s, truncated %d, judge pairs left out %d",
        len(examples), used_by_kind, base.uri, precision, config.num_processes, config.launcher,
        prepared.n_dropped, prepared.n_truncated, mixing["judge_left_out"],
    )  # fmt: skip
    resume_uri = None
    if keep_state:
        resume_uri = _find_resume(state_uri, fs, _job_fingerprint(base, examples, config, precision))
    resumed_from_step = _checkpoint_step(resume_uri) if resume_uri else 0
    source = {
        "kind": "dpo",
        "base_uri": base.uri,
        "base_sha256": base.sha256,
        "n_pairs_used": len(examples),
        "n_pairs_used_by_kind": used_by_kind,
        "n_pairs_dropped": prepared.n_dropped,
        "n_pairs_truncated": prepared.n_truncated,
        "mixing": mixing,
        "resumed_from_step": resumed_from_step,
        "precision": precision,
        "config": config.model_dump(mode="json"),
        "trl": importlib.metadata.version("trl"),
        "transformers": importlib.metadata.version("transformers"),
    }

    with scratch_folder() as scratch_dir:
        if on_ray:
            spec = RayTrainSpec(
                token=uuid.uuid4().hex,
                base=base,
                examples=examples,
                config=config,
                precision=precision,
                state_uri=state_uri if keep_state else None,
                resume_uri=resume_uri,
                output_uri=output_uri,
                adapter_uri=adapter_uri,
                source=source,
                fs=fs,
            )
            outcome = run_ray_train(spec, ray, scratch_dir / "ray_train")
        else:
            job = local_job(
                config, precision, base_dir, examples, scratch_dir, state_uri if keep_state else None, resume_uri, fs, work_dir
            )
            if config.num_processes == 1:
                run_job(job, fs=fs, callbacks=callbacks)
            else:
                if fs is not None and keep_state:
                    job.fs_json = fs.to_json()
                run_child(job, scratch_dir, config)
            outcome = save_outputs(job, source, output_uri, adapter_uri, fs)
    if keep_state:
        remote_fs, root = filesystem_and_path(state_uri, fs)
        if remote_fs.exists(root):
            remote_fs.rm(root, recursive=True)
    logger.info("saved %s (sha256 %s)", outcome.model.uri, outcome.model.sha256)
    return TrainResult(
        model=outcome.model,
        metrics=metrics_table(outcome.log_history),
        n_pairs_used=len(examples),
        n_pairs_used_by_kind=used_by_kind,
        n_pairs_dropped=prepared.n_dropped,
        n_pairs_truncated=prepared.n_truncated,
        n_steps=outcome.n_steps,
        precision=precision,
        mixing=mixing,
        adapter=outcome.adapter,
        resumed_from_step=resumed_from_step,
        num_processes=outcome.world_size,
        train_seconds=outcome.train_seconds,
    )
