"""DPO's implicit rewards, measured after training: the log-probabilities of a pair's completions
under a checkpoint (`completion_logps`), and the implicit reward margin of a policy over its
reference (`implicit_reward_margins`). torch and transformers are imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from metareward.checkpoints import ModelRef, materialize
from metareward.training.dpo import _free_memory
from metareward.training.examples import TEXT_COLUMNS, check_pairs

if TYPE_CHECKING:
    import fsspec


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
