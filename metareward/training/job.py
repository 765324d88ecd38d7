"""One training run as a `TrainJob` spec: `local_job` writes its files on a machine, `run_job` runs
TRL's DPOTrainer on it (in this process, in each rank of the child or in each Ray Train worker;
it writes local folders), and `save_outputs` saves what the main rank wrote as checkpoints.

LoRA (`lora`): TRL trains a peft adapter on the base (the reference is the base with the adapter
disabled); the adapter is saved as a checkpoint of its own (`adapter_config.json`,
`adapter_model.safetensors`, the base's `config.json` and tokenizer, manifest + sha256) that a
vLLM engine can serve as a LoRA (`LoRARequest(name, id, folder)`), and merged into the base
weights to give the full checkpoint M_i.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metareward.checkpoints import ModelRef, save_checkpoint
from metareward.training.config import TrainingConfig
from metareward.training.dpo import _free_memory, _merge_adapter, _peft_config, build_dpo_config
from metareward.training.resume import _download_state, _upload_callback

if TYPE_CHECKING:
    import fsspec


@dataclass
class TrainJob:
    """What one training run needs, as JSON (the job spec file a child rank reads).

    model_dir: the base checkpoint folder. examples_path: a JSON list of TRL examples.
    work_dir: the trainer's output folder (its local trainer checkpoints). model_out: where the
    main rank writes M_i (weights + tokenizer, no manifest). adapter_out: where it writes the
    LoRA adapter (None for full fine-tuning). state_uri: where trainer checkpoints are uploaded
    (None: not uploaded). resume_from: a local trainer checkpoint to resume from. result_path:
    where the main rank writes the log history, step count and train seconds. fs_json: the
    filesystem reaching `state_uri` (`AbstractFileSystem.to_json`, credentials included: the
    spec file lives in a private temporary folder), None for one built from the URL."""

    model_dir: str
    examples_path: str
    config: dict[str, Any]
    precision: str
    work_dir: str
    model_out: str
    adapter_out: str | None
    state_uri: str | None
    resume_from: str | None
    result_path: str
    fs_json: str | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: str | Path) -> TrainJob:
        return cls(**json.loads(Path(path).read_text()))


def run_job(job: TrainJob, fs: fsspec.AbstractFileSystem | None = None, callbacks: list[Any] | None = None) -> None:
    """Run TRL's DPOTrainer for `job` (in this process, or in each rank of the child) and, on the
    main rank, write the trained model to `job.model_out`, the adapter to `job.adapter_out`
    (LoRA) and the log history to `job.result_path`.

    The policy and the reference are both loaded by TRL from `model_dir` (TRL 1.16: with
    `ref_model=None` and full fine-tuning it builds the reference with `from_pretrained` on the
    policy's own path; with LoRA the reference is the base with the adapter disabled), so
    reference = the base checkpoint. `fs` reaches `job.state_uri`; `callbacks` are extra
    TrainerCallbacks, run after the upload of trainer checkpoints."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    config = TrainingConfig.model_validate(job.config)
    examples = json.loads(Path(job.examples_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    dataset = Dataset.from_list([{key: example[key] for key in ("prompt", "chosen", "rejected")} for example in examples])
    trainer_callbacks = ([_upload_callback(job.state_uri, fs)] if job.state_uri and config.save_steps else []) + list(callbacks or [])
    trainer = DPOTrainer(
        model=job.model_dir,
        ref_model=None,
        args=build_dpo_config(config, job.work_dir, job.precision),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_peft_config(config.lora) if config.lora is not None else None,
        callbacks=trainer_callbacks,
    )
    if len(trainer.train_dataset) != len(examples):
        # prepare_examples drops more than TRL does; a mismatch means TRL's rules changed.
        raise RuntimeError(
            f"TRL kept {len(trainer.train_dataset)} of the {len(examples)} prepared pairs; "
            "metareward's length rules no longer match this TRL version"
        )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=job.resume_from)
    seconds = time.perf_counter() - started
    # save_model gathers sharded (FSDP / ZeRO) weights; with LoRA it writes the adapter only.
    trainer.save_model(job.adapter_out if config.lora is not None else job.model_out)
    if trainer.is_world_process_zero():
        Path(job.result_path).write_text(
            json.dumps(
                {
                    "log_history": trainer.state.log_history,
                    "n_steps": trainer.state.global_step,
                    "train_seconds": seconds,
                    "world_size": trainer.accelerator.num_processes,
                }
            )
        )
    trainer.accelerator.wait_for_everyone()
    is_main = trainer.is_world_process_zero()
    # Free the policy, the reference and the optimizer state before merging and saving.
    trainer.ref_model = None
    del trainer
    _free_memory()
    if not is_main:
        return
    if config.lora is not None:
        _merge_adapter(Path(job.model_dir), Path(job.adapter_out), Path(job.model_out), tokenizer)
    for folder in (job.model_out, job.adapter_out):
        if folder is not None:
            # Trainer.save_model writes its TrainingArguments as a pickle; checkpoints hold none.
            (Path(folder) / "training_args.bin").unlink(missing_ok=True)


class _SavedFolder:
    """A folder a training run wrote, handed to `save_checkpoint` in place of a model and a
    tokenizer: its `save_pretrained` puts the folder's files (hard links where possible) into the
    checkpoint being written, so the parent needs no copy of the model in memory."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save_pretrained(self, destination: str | Path) -> None:
        for source in sorted(self.folder.iterdir()):
            target = Path(destination) / source.name
            if not source.is_file() or target.exists():
                continue
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def local_job(
    config: TrainingConfig,
    precision: str,
    model_dir: Path,
    examples: list[dict[str, Any]],
    scratch_dir: Path,
    state_uri: str | None,
    resume_uri: str | None,
    fs: fsspec.AbstractFileSystem | None,
    work_dir: str | Path | None = None,
) -> TrainJob:
    """The `TrainJob` of a machine: the examples file, the downloaded trainer checkpoint to resume
    from and the output folders, all in `scratch_dir`; `state_uri` None: no trainer checkpoints."""
    examples_path = scratch_dir / "examples.json"
    examples_path.write_text(json.dumps(examples))
    return TrainJob(
        model_dir=str(model_dir),
        examples_path=str(examples_path),
        config=config.model_dump(mode="json"),
        precision=precision,
        work_dir=str(Path(work_dir) if work_dir is not None else scratch_dir / "trainer"),
        model_out=str(scratch_dir / "model"),
        adapter_out=str(scratch_dir / "adapter") if config.lora is not None else None,
        state_uri=state_uri,
        resume_from=_download_state(resume_uri, state_uri, fs, scratch_dir / "resume") if resume_uri else None,
        result_path=str(scratch_dir / "result.json"),
    )


@dataclass(frozen=True)
class TrainOutcome:
    """What the main rank's run gave: the saved checkpoints and the trainer's account of the run."""

    model: ModelRef
    adapter: ModelRef | None
    log_history: list[dict[str, float]]
    n_steps: int
    train_seconds: float
    world_size: int


def save_outputs(
    job: TrainJob,
    source: dict[str, Any],
    output_uri: str,
    adapter_uri: str,
    fs: fsspec.AbstractFileSystem | None,
) -> TrainOutcome:
    """Save what the main rank of `job` wrote (model, LoRA adapter) as checkpoints at `output_uri`
    and `adapter_uri`, `source` plus the run's step count and world size in their manifests."""
    fitted = json.loads(Path(job.result_path).read_text())
    source = source | {"n_steps": fitted["n_steps"], "num_processes": fitted["world_size"]}
    adapter_ref = None
    if job.adapter_out is not None:
        adapter_files = _SavedFolder(Path(job.adapter_out))
        adapter_source = source | {"kind": "dpo-lora-adapter", "peft": importlib.metadata.version("peft")}
        adapter_ref = save_checkpoint(adapter_files, adapter_files, adapter_uri, fs=fs, source=adapter_source)
        source |= {"adapter_uri": adapter_ref.uri, "adapter_sha256": adapter_ref.sha256}
    model_files = _SavedFolder(Path(job.model_out))
    model_ref = save_checkpoint(model_files, model_files, output_uri, fs=fs, source=source)
    return TrainOutcome(
        model=model_ref,
        adapter=adapter_ref,
        log_history=fitted["log_history"],
        n_steps=fitted["n_steps"],
        train_seconds=fitted["train_seconds"],
        world_size=fitted["world_size"],
    )
