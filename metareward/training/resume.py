"""Trainer checkpoints in the run's storage, so that a killed train stage resumes.

Resuming (`save_steps` > 0 and a `state_uri`): TRL saves a trainer checkpoint every `save_steps`
optimizer steps; the main rank uploads it to `{state_uri}/checkpoint-{step}` (a `complete`
marker last, older ones removed) beside `job.json`, the fingerprint of (base sha256, examples,
settings). A re-run with the same fingerprint downloads the newest complete one and resumes from
it (`resume_from_checkpoint`: global step, optimizer, scheduler and data order continue); other
state is discarded. The state is removed once M_i is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metareward.checkpoints import ModelRef
from metareward.checkpoints.ref import filesystem_and_path
from metareward.training.config import TrainingConfig

if TYPE_CHECKING:
    import fsspec

logger = logging.getLogger(__name__)


# Written last into an uploaded trainer checkpoint: a checkpoint without it is incomplete.
STATE_COMPLETE_MARKER = "complete"
STATE_JOB_FILE = "job.json"


def _upload_callback(state_uri: str, fs: fsspec.AbstractFileSystem | None) -> Any:
    """A TrainerCallback that uploads each trainer checkpoint TRL saves to `state_uri` from the
    main rank (after every rank wrote its part), marker last, and removes the older ones."""
    from transformers import TrainerCallback

    class UploadTrainerCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            from accelerate import PartialState

            PartialState().wait_for_everyone()
            if state.is_world_process_zero:
                name = f"checkpoint-{state.global_step}"
                remote_fs, root = filesystem_and_path(state_uri, fs)
                target = f"{root}/{name}"
                remote_fs.put(str(Path(args.output_dir) / name), target, recursive=True)
                remote_fs.pipe_file(f"{target}/{STATE_COMPLETE_MARKER}", b"")
                for older in remote_fs.ls(root, detail=False):
                    if older.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint-") and older.rstrip("/") != target:
                        remote_fs.rm(older, recursive=True)
                logger.info("trainer checkpoint at step %d uploaded to %s", state.global_step, state_uri)
            PartialState().wait_for_everyone()

    return UploadTrainerCheckpoint()


def _job_fingerprint(base: ModelRef, examples: list[dict[str, Any]], config: TrainingConfig, precision: str) -> str:
    payload = {"base_sha256": base.sha256, "examples": examples, "config": config.model_dump(), "precision": precision}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _checkpoint_step(path: str) -> int | None:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    prefix = "checkpoint-"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def _find_resume(state_uri: str, fs: fsspec.AbstractFileSystem | None, fingerprint: str) -> str | None:
    """The location of the newest complete trainer checkpoint under `state_uri` made for the same
    job (`fingerprint`), or None; state left by another job is removed and this job's fingerprint
    written."""
    remote_fs, root = filesystem_and_path(state_uri, fs)
    remote_fs.invalidate_cache(root)
    job_key = f"{root}/{STATE_JOB_FILE}"
    if remote_fs.exists(job_key) and json.loads(remote_fs.cat_file(job_key)).get("fingerprint") == fingerprint:
        steps = sorted(
            (step, path)
            for path in remote_fs.ls(root, detail=False)
            if (step := _checkpoint_step(path)) is not None and remote_fs.exists(f"{path.rstrip('/')}/{STATE_COMPLETE_MARKER}")
        )
        if steps:
            step, path = steps[-1]
            logger.info("resuming training from the trainer checkpoint at step %d (%s)", step, path)
            return path.rstrip("/")
        return None
    if remote_fs.exists(root):
        logger.info("discarding trainer state at %s: it belongs to another training job", state_uri)
        remote_fs.rm(root, recursive=True)
    remote_fs.makedirs(root, exist_ok=True)
    remote_fs.pipe_file(job_key, json.dumps({"fingerprint": fingerprint}).encode("utf-8"))
    return None


def _download_state(resume_uri: str, state_uri: str, fs: fsspec.AbstractFileSystem | None, local_dir: Path) -> str:
    """A local copy of the trainer checkpoint `resume_uri` (found by `_find_resume`) in `local_dir`."""
    remote_fs, _ = filesystem_and_path(state_uri, fs)
    local = local_dir / resume_uri.rsplit("/", 1)[-1]
    remote_fs.get(resume_uri, str(local), recursive=True)
    return str(local)
