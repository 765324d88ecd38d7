"""The TRL and peft pieces of a training run: `build_dpo_config` (TrainingConfig -> TRL's
`DPOConfig`), the peft `LoraConfig` of `LoraSettings`, merging a trained adapter into a fresh copy
of its base, and freeing the memory a model held. torch, trl and peft are imported lazily."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from metareward.training.config import LoraSettings, TrainingConfig


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


def _peft_config(lora: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


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


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
