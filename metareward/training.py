"""The train stage: DPO with TRL on an iteration's preference pairs, M_{i-1} -> M_i.

What is supported now: full fine-tuning of a causal LM checkpoint (`ModelRef`, safetensors only)
with TRL's `DPOTrainer` (sigmoid loss), in this process, on one device (CPU, or one GPU that
`torch` sees), reference model = the base checkpoint M_{i-1} itself. The trained model is
written with `metareward.checkpoints.save_checkpoint` (manifest + sha256) to `output_uri`.

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

Layout of the code, so later work slots in: `prepare_examples` (pure: pairs -> TRL examples +
counts), `build_dpo_config` (TrainingConfig -> DPOConfig), `fit_dpo` (the trainer run on a local
checkpoint folder; what a `python -m metareward.training` child under `accelerate launch` would
call), `train_dpo` (materialize, fit, save, report). LoRA, several processes, resuming from
trainer checkpoints and mixing caps are not implemented here yet.

torch, transformers, datasets and trl are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from metareward.checkpoints import ModelRef, materialize, save_checkpoint
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

logger = logging.getLogger(__name__)

PAIRS_REQUIRED_COLUMNS = (KIND, PROMPT_ID, PROMPT, CHOSEN, REJECTED)
TEXT_COLUMNS = (PROMPT, CHOSEN, REJECTED)
DROP_REASONS = ("empty_text", "identical", "prompt_too_long", "too_long")


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
    n_steps: optimizer steps run. precision: the precision used ('bf16' or 'fp32').
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

    Fixed choices: no reporting integrations, no trainer checkpoints (the model is saved
    explicitly), sigmoid DPO loss, dropout off, model loaded in fp32 from safetensors with
    remote code refused, truncation `keep_start`."""
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
        bf16=precision == "bf16",
        fp16=False,
        # transformers 5 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing.
        activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        report_to="none",
        save_strategy="no",
        model_init_kwargs={"dtype": "float32", "use_safetensors": True},
        trust_remote_code=False,
    )


@dataclass
class FitOutput:
    """The trained model (in memory), its tokenizer, TRL's log history and the step count."""

    model: Any
    tokenizer: Any
    log_history: list[dict[str, float]]
    n_steps: int
    train_seconds: float


def fit_dpo(model_dir: Path, examples: list[dict[str, Any]], config: TrainingConfig, work_dir: Path, precision: str) -> FitOutput:
    """Run TRL's DPOTrainer on `examples` from the local checkpoint folder `model_dir`.

    The policy and the reference are both loaded by TRL from `model_dir` (TRL 1.16: with
    `ref_model=None` and full fine-tuning it builds the reference with `from_pretrained` on the
    policy's own path, with the same loading arguments), so reference = the base checkpoint.
    `work_dir` is the trainer's output folder (with `save_strategy="no"` it writes no trainer
    checkpoints there).
    """
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    dataset = Dataset.from_list([{key: example[key] for key in ("prompt", "chosen", "rejected")} for example in examples])
    trainer = DPOTrainer(
        model=str(model_dir),
        ref_model=None,
        args=build_dpo_config(config, work_dir, precision),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    if len(trainer.train_dataset) != len(examples):
        # prepare_examples drops more than TRL does; a mismatch means TRL's rules changed.
        raise RuntimeError(
            f"TRL kept {len(trainer.train_dataset)} of the {len(examples)} prepared pairs; "
            "metareward's length rules no longer match this TRL version"
        )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model = trainer.accelerator.unwrap_model(trainer.model)
    output = FitOutput(
        model=model,
        tokenizer=tokenizer,
        log_history=list(trainer.state.log_history),
        n_steps=trainer.state.global_step,
        train_seconds=seconds,
    )
    # Free the reference model and the optimizer state before the caller saves and moves on.
    trainer.ref_model = None
    del trainer
    _free_memory()
    return output


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


def train_dpo(
    pairs: pd.DataFrame,
    base: ModelRef,
    output_uri: str,
    config: TrainingConfig,
    fs: fsspec.AbstractFileSystem | None = None,
    work_dir: str | Path | None = None,
) -> TrainResult:
    """Train M_i from `base` (M_{i-1}, also the DPO reference) on `pairs` and save it at `output_uri`.

    `fs` reaches both the base and the output (an fsspec filesystem with endpoint and
    credentials; default: from the URLs). `work_dir` holds the trainer's scratch files (default:
    a temporary folder removed afterwards). Raises `ValueError` for bad or empty pairs (see the
    module docstring), `CheckpointError` for a base that does not verify.
    """
    from transformers import AutoTokenizer

    if output_uri.rstrip("/") == base.uri.rstrip("/"):
        raise ValueError(f"output_uri {output_uri!r} is the base checkpoint's location; the new model needs its own")
    check_pairs(pairs)
    base_dir = materialize(base, fs)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    prepared = prepare_examples(pairs, tokenizer, config)
    if not prepared.examples:
        raise NoTrainablePairs(len(pairs), prepared.n_dropped)
    precision = resolve_precision(config.precision)
    logger.info(
        "DPO on %d pairs (%s) from %s, %s; dropped %s, truncated %d",
        len(prepared.examples),
        prepared.n_by_kind,
        base.uri,
        precision,
        prepared.n_dropped,
        prepared.n_truncated,
    )

    if work_dir is not None:
        fitted = fit_dpo(base_dir, prepared.examples, config, Path(work_dir), precision)
    else:
        with tempfile.TemporaryDirectory(prefix="metareward-train-") as scratch:
            fitted = fit_dpo(base_dir, prepared.examples, config, Path(scratch), precision)
    source = {
        "kind": "dpo",
        "base_uri": base.uri,
        "base_sha256": base.sha256,
        "n_pairs_used": len(prepared.examples),
        "n_pairs_used_by_kind": prepared.n_by_kind,
        "n_pairs_dropped": prepared.n_dropped,
        "n_pairs_truncated": prepared.n_truncated,
        "n_steps": fitted.n_steps,
        "precision": precision,
        "config": config.model_dump(),
        "trl": importlib.metadata.version("trl"),
        "transformers": importlib.metadata.version("transformers"),
    }
    new_ref = save_checkpoint(fitted.model, fitted.tokenizer, output_uri, fs=fs, source=source)
    metrics = metrics_table(fitted.log_history)
    train_seconds = fitted.train_seconds
    del fitted
    _free_memory()
    logger.info("saved %s (sha256 %s)", new_ref.uri, new_ref.sha256)
    return TrainResult(
        model=new_ref,
        metrics=metrics,
        n_pairs_used=len(prepared.examples),
        n_pairs_used_by_kind=prepared.n_by_kind,
        n_pairs_dropped=prepared.n_dropped,
        n_pairs_truncated=prepared.n_truncated,
        n_steps=source["n_steps"],
        precision=precision,
        train_seconds=train_seconds,
    )
