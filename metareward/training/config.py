"""The settings of the train stage: `TrainingConfig` (the run config's `training` section),
`LoraSettings` (its `lora`) and `resolve_precision`, the precision a setting means on this machine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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

    model_config = ConfigDict(extra="forbid", json_schema_extra={"description": "LoRA adapter settings (peft `LoraConfig`)."})

    r: int = Field(
        8, ge=1, description="Rank of the update matrices (a vLLM engine serving the adapter needs `max_lora_rank` >= r)."
    )
    alpha: int = Field(16, ge=1, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input, in [0, 1).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get an adapter (the attention projections by default), or `all-linear`.",
    )


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

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "description": "DPO settings of the train stage. Defaults suit the embedded demo on CPU; the paper's values "
            "(lr 5e-6 cosine, global batch 32) belong in a paper config."
        },
    )

    beta: float = Field(0.1, gt=0, description="DPO beta: the pull towards the reference model M_{i-1} (the paper: 0.1).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW (the paper: 5e-6).")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule (`cosine` is the paper's)."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the training steps spent warming up.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the pairs.")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps; when set it overrides `num_train_epochs`.")
    per_device_train_batch_size: int = Field(1, ge=1, description="Pairs per forward pass and device.")
    gradient_accumulation_steps: int = Field(
        2, ge=1, description="Forward passes per optimizer step (global batch = batch size x accumulation x processes)."
    )
    seed: int = Field(0, ge=0, description="Seeds the data order and every random state of training.")
    max_length: int = Field(1024, ge=2, description="Longest sequence in tokens (chat-rendered prompt + completion) that trains.")
    long_pairs: Literal["drop", "truncate"] = Field(
        "drop", description="A pair longer than `max_length`: `drop` it or `truncate` its completions."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="`auto` (bf16 mixed precision on a CUDA GPU that supports it, else fp32), `bf16` or `fp32`."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass: less memory, more time.")
    logging_steps: int = Field(1, ge=1, description="Optimizer steps between two rows of the training metrics.")
    launcher: Literal["accelerate", "ray_train"] = Field(
        "accelerate", description="`accelerate` (this machine) or `ray_train` (Ray Train DDP workers on `execution.ray`)."
    )
    num_processes: int = Field(1, ge=1, description="Training processes: ranks under `accelerate`, workers under `ray_train`.")
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="Accelerate config with more than one process; `fsdp` and `deepspeed` need GPUs."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probabilities once before training and free the reference model."
    )
    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter instead of every weight; null: full fine-tuning.")
    max_judge_pairs: int | None = Field(
        None, ge=0, description="At most this many judge pairs train (a seeded choice); null: no cap."
    )
    judge_pairs_ratio: float | None = Field(
        None, ge=0, description="At most this many judge pairs per trainable actor pair; null: no ratio."
    )
    save_steps: int = Field(
        0, ge=0, description="Save a trainer checkpoint every this many optimizer steps, to resume from; 0: none."
    )

    @model_validator(mode="after")
    def _check_launcher(self) -> TrainingConfig:
        if self.launcher == "ray_train" and self.distributed != "ddp":
            raise ValueError(
                f"distributed {self.distributed!r} is an accelerate config; launcher 'ray_train' runs DDP "
                "workers: set distributed to 'ddp' or launcher to 'accelerate'"
            )
        return self


def choose_precision(precision: str, bf16_available: bool, bf16_needs: str) -> str:
    """'bf16' or 'fp32' for `TrainingConfig.precision` where bf16 is (or is not) available: `auto`
    picks bf16 where it is; `bf16` where it is not is refused, `bf16_needs` saying what it needs."""
    if precision == "auto":
        return "bf16" if bf16_available else "fp32"
    if precision == "bf16" and not bf16_available:
        raise ValueError(f"{bf16_needs}; use precision 'auto' or 'fp32'")
    return precision


def resolve_precision(precision: str) -> str:
    """'bf16' or 'fp32' for `TrainingConfig.precision` on this machine."""
    import torch

    bf16_available = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return choose_precision(precision, bf16_available, "precision 'bf16' needs a CUDA GPU with bf16 support and this machine has none")
