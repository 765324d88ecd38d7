"""The train stage: DPO with TRL on an iteration's preference pairs, M_{i-1} -> M_i.

Full fine-tuning or LoRA (peft) of a causal LM checkpoint (`ModelRef`, safetensors only) with
TRL's `DPOTrainer` (sigmoid loss), reference model = the base checkpoint M_{i-1} itself (its
log-probabilities optionally precomputed once, TRL's `precompute_ref_log_probs`), on CPU (fp32) or
CUDA GPUs (bf16 autocast), in this process or in several processes under `accelerate launch`. The
trained model is written with `metareward.checkpoints.save_checkpoint` (manifest + sha256) to
`output_uri`.

Pairs table (`docs/artifacts.md`): columns `kind` ('actor' | 'judge'), `prompt_id`, `prompt`
(the user turn text: the instruction for actor pairs, the filled judge prompt for judge pairs),
`chosen`, `rejected`; other columns are ignored. Each row becomes one TRL conversational
example: prompt = [user: prompt], chosen = [assistant: chosen], rejected = [assistant: rejected],
rendered with the checkpoint's own chat template (a default system turn that the template adds
is part of the prompt, as it is when the model generates from a user-only conversation).

Input rules (every drop is counted by reason in `TrainResult.n_pairs_dropped`):
- an empty table, missing columns, nulls, non-text values or an unknown `kind` raise `ValueError`
  (`SchemaError`) naming the column and value: they are bugs upstream, not data.
- `empty_text`: prompt, chosen or rejected is empty or only whitespace (a small model can emit
  an empty response; training on it teaches nothing about the preference).
- `identical`: chosen == rejected (the DPO gradient of such a pair is zero).
- length, measured in tokens of the chat-rendered sequence prompt + completion, against
  `max_length`: `prompt_too_long` when the rendered prompt alone has `max_length` tokens or more
  (no completion token would be left); otherwise, when the longer of the two sequences exceeds
  `max_length`, `long_pairs="drop"` (default) drops it as `too_long`, and `long_pairs="truncate"`
  keeps it and cuts the ends of the completions (TRL's `keep_start`), counted in
  `n_pairs_truncated`. Dropping is the default because a truncated pair loses its end of turn
  and, for length-controlled actor pairs, the very length difference the pair encodes.
- no pair left after the drops: `NoTrainablePairs` (a ValueError) with the counts; the train
  stage reports it like an iteration without pairs and the run stops there.

Mixing (`select_mix`): after the input rules, every trainable actor pair trains; judge pairs are
capped by `max_judge_pairs` and by `judge_pairs_ratio` x (trainable actor pairs), whichever is
smaller; the judge pairs kept are a seeded random choice (training `seed`), in table order. The
counts (`TrainResult.mixing`) go into the checkpoint manifest's `source` and the stage summary.

LoRA (`lora`): TRL trains a peft adapter on the base (the reference is the base with the adapter
disabled); the adapter is saved as a checkpoint of its own (`adapter_config.json`,
`adapter_model.safetensors`, the base's `config.json` and tokenizer, manifest + sha256) that a
vLLM engine can serve as a LoRA (`LoRARequest(name, id, folder)`), and merged into the base
weights to give the full checkpoint M_i.

Processes (`num_processes`): 1 trains in this process. More start ONE child process group,
`accelerate launch` with the shipped config `configs/accelerate/{distributed}.yaml` (resolved
from the repository checkout: the package is installed editable), each rank running
`python -m metareward.training.worker JOB` on a job spec file written by the parent. On a machine
without CUDA the ranks use `use_cpu` and the gloo backend. The main rank writes the model to a
local folder; the parent saves it with `save_checkpoint`. The group dies with the parent:
PR_SET_PDEATHSIG on the launcher and every rank, and the parent kills the group on any exception
(a cancelled flow run included) before re-raising.

Ray Train (`launcher: ray_train`): `num_processes` Ray Train workers (`TorchTrainer`, DDP) on the
cluster of `execution.ray` (`metareward.execution.connected`), one GPU each (nccl), or CPU workers
(gloo) when `execution.ray.gpus_per_engine` is 0, `cpus_per_engine` CPUs each. Each worker runs
`metareward.training.worker.train_loop_per_worker`: the node's first worker materializes the base and
writes the examples into a scratch folder of its node, then every worker runs `run_job`, the same
function the accelerate ranks run (Ray Train has set up torch.distributed and RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR; accelerate and TRL take them from there). Rank 0 saves M_i (and the
adapter) with `save_checkpoint` itself, straight to the run's storage, and hands the log history back
to the driver through a Ray queue. Storage: the workers read the base and rank 0 writes the outputs
and trainer checkpoints from whichever node it runs on, so with a cluster address the output,
adapter and state locations must be object storage (a local folder is refused), and a local base
(the embedded seed model) must be at the same path on every node. Ray Train's own run folder
(`RunConfig.storage_path`) is a scratch folder on the driver's node: its controller, which Ray
pins to that node, is the only writer, because no Ray Train checkpoint is reported. The
filesystem `fs` travels to the workers pickled, with the options it was built with (explicit
credentials included; credentials from each node's own environment or role do not travel).

Resuming (`save_steps` > 0 and a `state_uri`): TRL saves a trainer checkpoint every `save_steps`
optimizer steps; the main rank uploads it to `{state_uri}/checkpoint-{step}` (a `complete`
marker last, older ones removed) beside `job.json`, the fingerprint of (base sha256, examples,
settings). A re-run with the same fingerprint downloads the newest complete one and resumes from
it (`resume_from_checkpoint`: global step, optimizer, scheduler and data order continue); other
state is discarded. The state is removed once M_i is saved.

Layout of the code: `prepare_examples` and `select_mix` (pure: pairs -> TRL examples + counts),
`build_dpo_config` (TrainingConfig -> DPOConfig), `run_job` (the trainer run on a `TrainJob`, in
this process, in each rank of the child or in each Ray Train worker; writes local folders),
`save_outputs` (the trained folders -> checkpoints), `run_ray_train` (the driver side of Ray
Train), `train_dpo` (materialize, prepare, mix, resume, run, save, report).

torch, transformers, datasets and trl are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from metareward.checkpoints import ModelRef, materialize, save_checkpoint
from metareward.processes import child_environment, die_with_parent, kill_group
from metareward.schema import (
    CHOSEN,
    KIND,
    KIND_ACTOR,
    KIND_JUDGE,
    PROMPT,
    PROMPT_ID,
    REJECTED,
    SchemaError,
    require_columns,
    require_no_nulls,
    require_values,
)

if TYPE_CHECKING:
    import fsspec

    from metareward.execution import RayExecutionConfig

logger = logging.getLogger(__name__)

PAIRS_REQUIRED_COLUMNS = (KIND, PROMPT_ID, PROMPT, CHOSEN, REJECTED)
TEXT_COLUMNS = (PROMPT, CHOSEN, REJECTED)
DROP_REASONS = ("empty_text", "identical", "prompt_too_long", "too_long")
DISTRIBUTED_MODES = ("ddp", "fsdp", "deepspeed")
# The shipped accelerate config files (`configs/accelerate/{mode}.yaml`), from the repository checkout.
ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
# Written last into an uploaded trainer checkpoint: a checkpoint without it is incomplete.
STATE_COMPLETE_MARKER = "complete"
STATE_JOB_FILE = "job.json"


class LoraSettings(BaseModel):
    """LoRA adapter settings (peft `LoraConfig`).

    Parameters:
        r (`int`, *optional*, defaults to `8`):
            Rank of the update matrices. A vLLM engine serving the adapter needs `max_lora_rank` >= r.
        alpha (`int`, *optional*, defaults to `16`):
            Scaling numerator: the update is scaled by alpha / r.
        dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the adapter's input, in [0, 1). 0: DPO turns the model's dropout off too.
        target_modules (`list[str]` or `str`, *optional*, defaults to `["q_proj", "k_proj", "v_proj", "o_proj"]`):
            Module names that get an adapter (Llama-style attention projections by default), or
            `"all-linear"`.
    """

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainingConfig(BaseModel):
    """DPO settings of the train stage. Defaults suit the embedded demo on CPU (a few dozen pairs,
    135M parameters); the paper's values (lr 5e-6 cosine, global batch 32) belong in a paper config.

    Parameters:
        > Parameters that control the DPO objective

        beta (`float`, *optional*, defaults to `0.1`):
            Strength of the pull towards the reference model M_{i-1} (the paper's value).

        > Parameters that control the optimisation

        learning_rate (`float`, *optional*, defaults to `2e-5`):
            Peak learning rate of AdamW. Higher than the paper's 5e-6 because the demo trains a
            handful of steps per iteration and should still move the model measurably.
        lr_scheduler_type (`str`, *optional*, defaults to `"cosine"`):
            `cosine` (the paper's), `linear`, `constant` or `constant_with_warmup`.
        warmup_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of the training steps spent warming up, in [0, 1). 0 by default: with a few
            steps, a warm-up step at learning rate 0 is a wasted step.
        num_train_epochs (`float`, *optional*, defaults to `1.0`):
            Passes over the pairs.
        max_steps (`int`, *optional*):
            Cap on optimizer steps; when set it overrides `num_train_epochs` (as in transformers).
        per_device_train_batch_size (`int`, *optional*, defaults to `1`):
            Pairs per forward pass and device. 1 on CPU: no padding of a short actor pair to a
            long judge pair, and half the activation memory of 2 (docs/performance.md).
        gradient_accumulation_steps (`int`, *optional*, defaults to `2`):
            Forward passes per optimizer step (global batch = batch size x accumulation x devices).
        seed (`int`, *optional*, defaults to `0`):
            Seeds the data order and every random state of the run.

        > Parameters that control the data

        max_length (`int`, *optional*, defaults to `1024`):
            Longest sequence in tokens (chat-rendered prompt + completion) that trains.
        long_pairs (`str`, *optional*, defaults to `"drop"`):
            What happens to a pair whose longer sequence exceeds `max_length`: `drop` (counted as
            `too_long`) or `truncate` (completion ends cut, counted in `n_pairs_truncated`).
            Pairs whose prompt alone fills `max_length` are dropped either way.

        > Parameters that control the hardware

        precision (`str`, *optional*, defaults to `"auto"`):
            `auto`: bf16 mixed precision on a CUDA GPU that supports it, fp32 otherwise (CPU);
            `bf16` (needs such a GPU); `fp32`. Weights stay fp32 either way (bf16 is autocast), and
            the checkpoint is saved in fp32. TRL's own default (bf16 on) fails on a CPU.
        gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            Recompute activations in the backward pass. Measured on the embedded model with
            demo-length judge pairs (~570 tokens): peak memory 6.6 -> 5.1 GB for 14% more CPU
            time (docs/performance.md), which keeps the demo under its 6 GB budget. Turn it off
            where memory is plentiful and time is not.
        logging_steps (`int`, *optional*, defaults to `1`):
            Optimizer steps between two rows of `TrainResult.metrics` (each row averages the steps
            since the previous one).
        launcher (`str`, *optional*, defaults to `"accelerate"`):
            `accelerate`: on this machine; `num_processes` 1 trains in the stage's own process,
            more run `accelerate launch` in a child process group. `ray_train`: `num_processes`
            Ray Train workers (DDP) on the Ray cluster of `execution.ray` (its `address`; `local`
            starts Ray on this machine), possibly on several machines: one GPU per worker (nccl),
            or CPU workers (gloo) when `execution.ray.gpus_per_engine` is 0, with
            `execution.ray.cpus_per_engine` CPUs each; `precision: auto` is then bf16 on GPU
            workers. With a cluster address the run's storage must be object storage. Needs the
            `ray` extra; only `distributed: ddp`.
        num_processes (`int`, *optional*, defaults to `1`):
            Training processes: ranks under `accelerate`, workers under `ray_train` (one per GPU,
            or per CPU share with the gloo backend). Global batch = batch size x accumulation x
            processes.
        distributed (`str`, *optional*, defaults to `"ddp"`):
            Which shipped accelerate config (`configs/accelerate/{distributed}.yaml`) the child
            launches with when `num_processes` > 1: `ddp`, `fsdp` (full sharding, GPUs) or
            `deepspeed` (ZeRO-2; needs the `deepspeed` package, GPUs). On CPU, and with
            `launcher: ray_train`, only `ddp`.

        > Parameters that control the reference and the adapter

        precompute_ref_log_probs (`bool`, *optional*, defaults to `False`):
            TRL's option: compute the reference log-probabilities of every pair once before
            training and free the reference model, so training holds one model instead of two.
        lora (`LoraSettings`, *optional*):
            Train a LoRA adapter instead of every weight (`{r, alpha, dropout, target_modules}`);
            the adapter is merged into M_i and also kept for serving. None: full fine-tuning.

        > Parameters that control the mix of pairs

        max_judge_pairs (`int`, *optional*):
            At most this many judge pairs train (a seeded choice); None: no cap.
        judge_pairs_ratio (`float`, *optional*):
            At most this many judge pairs per trainable actor pair (e.g. 1.0: no more judge than
            actor pairs); None: no ratio. With both set, the smaller limit applies.

        > Parameters that control resuming

        save_steps (`int`, *optional*, defaults to `0`):
            Save a trainer checkpoint (weights, optimizer, scheduler, data position) to the run's
            storage every this many optimizer steps, so a killed stage resumes from the newest one;
            0: none (a killed stage starts over).
    """

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    per_device_train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    max_length: int = Field(1024, ge=2)
    long_pairs: Literal["drop", "truncate"] = "drop"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    logging_steps: int = Field(1, ge=1)
    launcher: Literal["accelerate", "ray_train"] = "accelerate"
    num_processes: int = Field(1, ge=1)
    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    precompute_ref_log_probs: bool = False
    lora: LoraSettings | None = None
    max_judge_pairs: int | None = Field(None, ge=0)
    judge_pairs_ratio: float | None = Field(None, ge=0)
    save_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_launcher(self) -> TrainingConfig:
        if self.launcher == "ray_train" and self.distributed != "ddp":
            raise ValueError(
                f"distributed {self.distributed!r} is an accelerate config; launcher 'ray_train' runs DDP "
                "workers: set distributed to 'ddp' or launcher to 'accelerate'"
            )
        return self


@dataclass(frozen=True)
class PreparedExamples:
    """TRL conversational examples built from a pairs table, and what was left out.

    `examples[i]` has keys prompt, chosen, rejected (message lists), plus `kind` and `prompt_id`
    of its row; `n_dropped` has every reason of `DROP_REASONS` (0 when none)."""

    examples: list[dict[str, Any]]
    n_dropped: dict[str, int]
    n_truncated: int

    @property
    def n_by_kind(self) -> dict[str, int]:
        counts = {KIND_ACTOR: 0, KIND_JUDGE: 0}
        for example in self.examples:
            counts[example[KIND]] += 1
        return counts


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


class NoTrainablePairs(ValueError):
    """Every pair was dropped by the input rules; `dropped` counts them by reason."""

    def __init__(self, n_pairs: int, dropped: dict[str, int]):
        self.n_pairs = n_pairs
        self.dropped = dict(dropped)
        super().__init__(f"pairs: none of the {n_pairs} pairs is trainable (dropped by reason: {self.dropped})")


# --- input ------------------------------------------------------------------------------------


def check_pairs(pairs: pd.DataFrame, name: str = "pairs") -> None:
    """Raise `SchemaError` (a ValueError) unless `pairs` has rows, the required columns without
    nulls, text in the text columns and a known `kind` on every row."""
    require_columns(pairs, PAIRS_REQUIRED_COLUMNS, name)
    if pairs.empty:
        raise SchemaError(f"{name}: no rows; there is nothing to train on (an iteration without pairs must not train)")
    require_no_nulls(pairs, PAIRS_REQUIRED_COLUMNS, name)
    require_values(pairs, KIND, (KIND_ACTOR, KIND_JUDGE), name)
    for column in TEXT_COLUMNS:
        not_text = ~pairs[column].map(lambda value: isinstance(value, str)).to_numpy()
        if not_text.any():
            row = pairs.index[not_text][0]
            value = pairs[column].to_numpy()[not_text][0]
            raise SchemaError(f"{name}: column {column!r} must hold text; row {row!r} holds {type(value).__name__} {value!r}")


def _chat_token_count(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> int:
    # Tokenized exactly as TRL's DPOTrainer does (apply_chat_template, tokenize=True).
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return len(encoded["input_ids"])


def prepare_examples(pairs: pd.DataFrame, tokenizer: Any, config: TrainingConfig) -> PreparedExamples:
    """Check `pairs`, apply the input rules of the module docstring, and build TRL examples.

    `tokenizer` must carry a chat template (the base checkpoint's). Row order is kept."""
    check_pairs(pairs)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the base checkpoint's tokenizer has no chat template; DPO on conversational pairs needs the "
            "model's own template (tokenizer_config.json 'chat_template' or chat_template.jinja)"
        )
    dropped = dict.fromkeys(DROP_REASONS, 0)
    truncated = 0
    examples: list[dict[str, Any]] = []
    for row in pairs[list(PAIRS_REQUIRED_COLUMNS)].itertuples(index=False):
        kind, prompt_id, prompt, chosen, rejected = row
        if not (prompt.strip() and chosen.strip() and rejected.strip()):
            dropped["empty_text"] += 1
            continue
        if chosen == rejected:
            dropped["identical"] += 1
            continue
        prompt_messages = [{"role": "user", "content": prompt}]
        chosen_messages = [{"role": "assistant", "content": chosen}]
        rejected_messages = [{"role": "assistant", "content": rejected}]
        if _chat_token_count(tokenizer, prompt_messages, add_generation_prompt=True) >= config.max_length:
            dropped["prompt_too_long"] += 1
            continue
        longest = max(
            _chat_token_count(tokenizer, prompt_messages + chosen_messages, add_generation_prompt=False),
            _chat_token_count(tokenizer, prompt_messages + rejected_messages, add_generation_prompt=False),
        )
        if longest > config.max_length:
            if config.long_pairs == "drop":
                dropped["too_long"] += 1
                continue
            truncated += 1
        examples.append(
            {
                "prompt": prompt_messages,
                "chosen": chosen_messages,
                "rejected": rejected_messages,
                KIND: kind,
                PROMPT_ID: str(prompt_id),
            }
        )
    return PreparedExamples(examples=examples, n_dropped=dropped, n_truncated=truncated)


def select_mix(
    kinds: list[str],
    max_judge_pairs: int | None,
    judge_pairs_ratio: float | None,
    seed: int,
) -> tuple[list[int], dict[str, int]]:
    """Which pairs train, given the `kind` of each trainable pair: every actor pair, and judge
    pairs up to the smaller of `max_judge_pairs` and floor(`judge_pairs_ratio` x actor pairs)
    (None: no such limit), chosen at random with `seed` when there are more.

    Returns the positions kept (ascending, so the table order is kept) and the counts
    `actor_available`, `judge_available`, `actor_used`, `judge_used`, `judge_left_out`."""
    import numpy as np

    actor = [position for position, kind in enumerate(kinds) if kind == KIND_ACTOR]
    judge = [position for position, kind in enumerate(kinds) if kind == KIND_JUDGE]
    unknown = sorted(set(kinds) - {KIND_ACTOR, KIND_JUDGE})
    if unknown:
        raise ValueError(f"pairs: unknown kind(s) {unknown}; expected {KIND_ACTOR!r} or {KIND_JUDGE!r}")
    limit = len(judge)
    if max_judge_pairs is not None:
        limit = min(limit, max_judge_pairs)
    if judge_pairs_ratio is not None:
        # The small epsilon keeps 0.3 x 10 at 3 despite binary floating point.
        limit = min(limit, int(judge_pairs_ratio * len(actor) + 1e-9))
    kept_judge = judge
    if limit < len(judge):
        chosen = np.random.default_rng(seed).choice(len(judge), size=limit, replace=False)
        kept_judge = [judge[index] for index in sorted(chosen.tolist())]
    counts = {
        "actor_available": len(actor),
        "judge_available": len(judge),
        "actor_used": len(actor),
        "judge_used": len(kept_judge),
        "judge_left_out": len(judge) - len(kept_judge),
    }
    return sorted(actor + kept_judge), counts


# --- the trainer --------------------------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """'bf16' or 'fp32' for `TrainingConfig.precision` on this machine."""
    import torch

    bf16_available = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16_available else "fp32"
    if precision == "bf16" and not bf16_available:
        raise ValueError(
            "precision 'bf16' needs a CUDA GPU with bf16 support and this machine has none; "
            "use precision 'auto' or 'fp32'"
        )
    return precision


def build_dpo_config(config: TrainingConfig, output_dir: str | Path, precision: str) -> Any:
    """The TRL `DPOConfig` for `config` (`precision` as resolved by `resolve_precision`).

    Fixed choices: no reporting integrations, sigmoid DPO loss, dropout off, model loaded in fp32
    from safetensors with remote code refused, truncation `keep_start`, `use_cpu` where no CUDA
    GPU is seen (so several ranks on CPU use gloo). Trainer checkpoints only every `save_steps`
    steps (the newest one kept locally: the uploaded copy is what resumes), never at the end
    (the model is saved explicitly)."""
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        beta=config.beta,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        # transformers 5 reads a warmup_steps value below 1 as a fraction of the training steps.
        warmup_steps=config.warmup_ratio,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        # transformers 5 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing.
        activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        report_to="none",
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=1,
        model_init_kwargs={"dtype": "float32", "use_safetensors": True},
        trust_remote_code=False,
    )


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


def _state_fs(state_uri: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str]:
    import fsspec.core

    if fs is not None:
        return fs, fs._strip_protocol(state_uri)
    return fsspec.core.url_to_fs(state_uri)


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
                remote_fs, root = _state_fs(state_uri, fs)
                target = f"{root}/{name}"
                remote_fs.put(str(Path(args.output_dir) / name), target, recursive=True)
                remote_fs.pipe_file(f"{target}/{STATE_COMPLETE_MARKER}", b"")
                for older in remote_fs.ls(root, detail=False):
                    if older.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint-") and older.rstrip("/") != target:
                        remote_fs.rm(older, recursive=True)
                logger.info("trainer checkpoint at step %d uploaded to %s", state.global_step, state_uri)
            PartialState().wait_for_everyone()

    return UploadTrainerCheckpoint()


def _peft_config(lora: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


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


def _merge_adapter(model_dir: Path, adapter_dir: Path, model_out: Path, tokenizer: Any) -> None:
    """Merge the saved adapter into a fresh fp32 copy of the base and write it to `model_out`; give
    the adapter folder the base's config.json so it is a hashed checkpoint folder too."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(model_out))
    tokenizer.save_pretrained(str(model_out))
    base.config.save_pretrained(str(adapter_dir))
    del merged, base
    _free_memory()


# --- the child process --------------------------------------------------------------------------


def accelerate_config_file(mode: str) -> Path:
    """The shipped accelerate config for `mode` (`ddp`, `fsdp`, `deepspeed`)."""
    path = ACCELERATE_CONFIG_DIR / f"{mode}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"training.distributed {mode!r}: accelerate config {path} not found (metareward ships it in the "
            "repository's configs/accelerate/; install the package editable from a checkout)"
        )
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(job_path: Path, config: TrainingConfig) -> list[str]:
    """`accelerate launch` of `metareward.training.worker` on `job_path` with the shipped config."""
    import torch

    if not torch.cuda.is_available() and config.distributed != "ddp":
        raise ValueError(f"training.distributed {config.distributed!r} needs CUDA GPUs; on CPU use 'ddp' (gloo)")
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_file(config.distributed)),
        "--num_processes", str(config.num_processes),
        "--main_process_port", str(_free_port()),
        "--module", "metareward.training.worker", str(job_path),
    ]  # fmt: skip


def run_child(job: TrainJob, job_dir: Path, config: TrainingConfig) -> None:
    """Run `job` in `config.num_processes` ranks under `accelerate launch`, in a process group of
    its own that dies with this process; any exception here (a cancelled flow run included) kills
    the group before it propagates. Raises `RuntimeError` with the child's output tail when it fails."""
    import torch

    job_path = job_dir / "job.json"
    job.write(job_path)
    environment = child_environment()
    if not torch.cuda.is_available():
        environment["ACCELERATE_USE_CPU"] = "true"
    log_path = job_dir / "child.log"
    command = launch_command(job_path, config)
    logger.info("training in %d processes: %s", config.num_processes, " ".join(command))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
        )
        try:
            returncode = process.wait()
        finally:
            # The ranks may outlive a failed launcher for a moment: the group must be empty either way.
            kill_group(process)
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"training child (accelerate launch, {config.num_processes} processes) exited with {returncode}:\n{tail}")


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def metrics_table(log_history: list[dict[str, float]]) -> pd.DataFrame:
    """One row per logging step (the entries of TRL's log history that carry a `loss`), `step` first."""
    rows = [entry for entry in log_history if "loss" in entry]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64")})
    table["step"] = table["step"].astype("int64")
    return table[["step"] + [column for column in table.columns if column != "step"]]


# --- implicit rewards ---------------------------------------------------------------------------


def _completion_logps(model_dir: Path, conversations: list[tuple[list, list]], batch_size: int = 8) -> list[float]:
    """Sum of the log-probabilities of each completion's tokens given its prompt, under the model
    in `model_dir`; one (prompt messages, completion messages) per entry, rendered as TRL does.
    Sequences go through the model `batch_size` at a time, right-padded (padding after the last
    real token changes no real token's logits in a causal model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    model.eval()
    sequences = []  # (token ids, index of the first completion token)
    for prompt_messages, completion_messages in conversations:
        prompt_ids = tokenizer.apply_chat_template(
            prompt_messages, tokenize=True, return_dict=True, add_generation_prompt=True
        )["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt_messages + completion_messages, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        # The completion starts where the two renderings diverge (TRL's rule).
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids)))
        sequences.append((full_ids, max(start, 1)))
    sums: list[float] = []
    with torch.no_grad():
        for offset in range(0, len(sequences), batch_size):
            batch = sequences[offset : offset + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            completion_mask = torch.zeros((len(batch), width - 1), dtype=torch.bool)
            for row, (ids, start) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                completion_mask[row, start - 1 : len(ids) - 1] = True  # logits at t predict token t + 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            token_log_probs = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
            sums.extend((token_log_probs * completion_mask).sum(dim=1).tolist())
    del model
    _free_memory()
    return sums


def completion_logps(model: ModelRef, pairs: pd.DataFrame, fs: fsspec.AbstractFileSystem | None = None) -> pd.DataFrame:
    """log pi(chosen | prompt) and log pi(rejected | prompt) of each pair under the checkpoint
    `model` (loaded fp32 from verified safetensors): columns `chosen_logps`, `rejected_logps`,
    the index of `pairs`. Each is the sum of the completion tokens' log-probabilities, the pair
    rendered with the checkpoint's chat template exactly as TRL renders it (the quantities TRL
    logs as logps/chosen and logps/rejected), with no truncation."""
    check_pairs(pairs)
    conversations = []
    for prompt, chosen, rejected in pairs[list(TEXT_COLUMNS)].itertuples(index=False):
        prompt_messages = [{"role": "user", "content": prompt}]
        conversations.append((prompt_messages, [{"role": "assistant", "content": chosen}]))
        conversations.append((prompt_messages, [{"role": "assistant", "content": rejected}]))
    sums = _completion_logps(materialize(model, fs), conversations)
    return pd.DataFrame({"chosen_logps": sums[0::2], "rejected_logps": sums[1::2]}, index=pairs.index)


def implicit_reward_margins(
    policy: ModelRef,
    reference: ModelRef,
    pairs: pd.DataFrame,
    beta: float,
    fs: fsspec.AbstractFileSystem | None = None,
) -> pd.Series:
    """The DPO implicit reward margin of each pair (index of `pairs`):

        beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))]

    with the log-probabilities of `completion_logps` (policy and reference loaded one after the
    other). Positive: the policy prefers chosen over rejected more than the reference does; 0
    for every pair when the policy is the reference. TRL's logged `rewards/margins` is the mean of
    this over a batch, measured before that step's update."""
    policy_logps = completion_logps(policy, pairs, fs)
    reference_logps = completion_logps(reference, pairs, fs)
    log_ratios = policy_logps - reference_logps
    return (beta * (log_ratios["chosen_logps"] - log_ratios["rejected_logps"])).rename("margin")


# --- the stage ----------------------------------------------------------------------------------


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


def _sibling_uri(uri: str, name: str) -> str:
    return f"{uri.rstrip('/').rsplit('/', 1)[0]}/{name}"


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
    remote_fs, root = _state_fs(state_uri, fs)
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
    remote_fs, _ = _state_fs(state_uri, fs)
    local = local_dir / resume_uri.rsplit("/", 1)[-1]
    remote_fs.get(resume_uri, str(local), recursive=True)
    return str(local)


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


# --- Ray Train ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayTrainSpec:
    """What every Ray Train worker needs (`train_loop_config["spec"]`): the base checkpoint (each
    node materializes it), the examples, the settings, where trainer checkpoints go and which to
    resume from, where rank 0 saves M_i and the adapter with which manifest `source`, the
    filesystem of those locations, and `results`, the Ray queue rank 0 puts its `TrainOutcome` in.
    `token` names the run's scratch folder on each node."""

    token: str
    base: ModelRef
    examples: list[dict[str, Any]]
    config: TrainingConfig
    precision: str
    state_uri: str | None
    resume_uri: str | None
    output_uri: str
    adapter_uri: str
    source: dict[str, Any]
    fs: Any
    results: Any = None


def ray_train_precision(precision: str, gpu_workers: bool) -> str:
    """`TrainingConfig.precision` for Ray Train workers, decided on the driver (which may have no
    GPU): `auto` is bf16 on GPU workers, fp32 on CPU workers. Each GPU worker checks bf16 support."""
    if precision == "auto":
        return "bf16" if gpu_workers else "fp32"
    if precision == "bf16" and not gpu_workers:
        raise ValueError(
            "training.precision 'bf16' needs GPU workers, and execution.ray.gpus_per_engine 0 gives CPU workers; "
            "use precision 'auto' or 'fp32'"
        )
    return precision


def require_ray_train() -> None:
    """Raise `ExecutionError` with the install hint unless Ray Train can be imported."""
    from metareward.execution import INSTALL_HINT, ExecutionError

    try:
        import ray.train.torch  # noqa: F401
    except ImportError as error:
        raise ExecutionError(f"training.launcher is 'ray_train' but {error.name} is not installed: {INSTALL_HINT}") from None


def check_ray_train_locations(ray: RayExecutionConfig, locations: dict[str, str | None]) -> None:
    """Refuse a cluster address with an output location (`locations`: name -> URI, None for
    unused) in a local folder, which rank 0, on whichever node it runs, may not be able to write."""
    from metareward.execution import ExecutionError

    if not ray.is_cluster:
        return
    for name, uri in locations.items():
        if uri is not None and fsspec_protocol(uri) == "file":
            raise ExecutionError(
                f"training.launcher is 'ray_train' on the cluster at execution.ray.address {ray.address!r}: rank 0 may "
                f"run on another machine, which cannot write the local folder {uri!r} ({name}); set storage.root to "
                "object storage (s3://bucket/prefix) every node can reach"
            )


def fsspec_protocol(uri: str) -> str:
    """'file' for a local path or file:// URL, else the URL's protocol ('s3')."""
    import fsspec.utils

    protocol = fsspec.utils.get_protocol(uri)
    return "file" if protocol in ("file", "local") else protocol


def check_worker_resources(cluster: dict[str, float], workers: int, per_worker: dict[str, float]) -> None:
    """Raise `ExecutionError` when the cluster's resources (`ray.cluster_resources()`) cannot hold
    `workers` x `per_worker` at once: Ray Train would wait for them forever."""
    from metareward.execution import ExecutionError

    for name, amount in per_worker.items():
        if cluster.get(name, 0.0) < workers * amount:
            raise ExecutionError(
                f"training.num_processes is {workers}: {workers} Ray Train workers need {workers * amount:g} {name} "
                f"({amount:g} each) and the Ray cluster has {cluster.get(name, 0.0):g}; lower training.num_processes"
                + (", or set execution.ray.gpus_per_engine to 0 for CPU workers" if name == "GPU" else ", or execution.ray.cpus_per_engine")
            )


def run_ray_train(spec: RayTrainSpec, ray: RayExecutionConfig, storage_dir: Path) -> TrainOutcome:
    """Run `spec` on `spec.config.num_processes` Ray Train workers of the cluster `ray` and return
    rank 0's outcome. `storage_dir`: Ray Train's run folder, on this machine (its controller runs
    here). A failed worker fails the run (no Ray-level retry: the stage's retry resumes from the
    trainer checkpoints). Raises `RuntimeError` naming the failure."""
    import ray as ray_module
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from metareward.execution import connected
    from metareward.training.worker import train_loop_per_worker

    gpu_workers = ray.gpus_per_engine > 0
    resources = {"CPU": ray.cpus_per_engine} | ({"GPU": 1} if gpu_workers else {})
    # Ray leaves CUDA_VISIBLE_DEVICES alone for an actor without GPUs: CPU workers must not see any.
    # Ray Train's print patch also writes what a library captures from stdout (dill's dis.dis under
    # datasets' fingerprinting: pages of bytecode per worker); plain stdout is forwarded all the same.
    worker_env = {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    worker_env |= {} if gpu_workers else {"CUDA_VISIBLE_DEVICES": ""}
    workers = spec.config.num_processes
    with connected(ray):
        check_worker_resources(ray_module.cluster_resources(), workers, resources)
        results = Queue(actor_options={"num_cpus": 0})
        try:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"spec": replace(spec, results=results)},
                torch_config=TorchConfig(backend="nccl" if gpu_workers else "gloo"),
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu_workers, resources_per_worker=resources),
                run_config=RunConfig(
                    name=f"metareward-train-{spec.token}",
                    storage_path=str(storage_dir),
                    worker_runtime_env={"env_vars": worker_env},
                ),
            )
            logger.info("training on %d Ray Train worker(s), %s each, at %s", workers, resources, ray.address)
            try:
                trainer.fit()
            except TrainingFailedError as error:
                raise RuntimeError(f"training under Ray Train ({workers} workers) failed: {error}") from error
            try:
                return results.get(block=False)
            except Empty:
                raise RuntimeError("training under Ray Train ended without rank 0's result") from None
        finally:
            results.shutdown()


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
    machine). Raises `ValueError` for bad or empty pairs (see the module docstring),
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

    with tempfile.TemporaryDirectory(prefix="metareward-train-") as scratch:
        scratch_dir = Path(scratch)
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
        remote_fs, root = _state_fs(state_uri, fs)
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
