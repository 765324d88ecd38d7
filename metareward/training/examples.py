"""The input of the train stage: a pairs table -> TRL conversational examples, by the input rules,
and which of them train (the judge-pair mix).

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

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
from metareward.training.config import TrainingConfig


PAIRS_REQUIRED_COLUMNS = (KIND, PROMPT_ID, PROMPT, CHOSEN, REJECTED)
TEXT_COLUMNS = (PROMPT, CHOSEN, REJECTED)
DROP_REASONS = ("empty_text", "identical", "prompt_too_long", "too_long")


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


class NoTrainablePairs(ValueError):
    """Every pair was dropped by the input rules; `dropped` counts them by reason."""

    def __init__(self, n_pairs: int, dropped: dict[str, int]):
        self.n_pairs = n_pairs
        self.dropped = dict(dropped)
        super().__init__(f"pairs: none of the {n_pairs} pairs is trainable (dropped by reason: {self.dropped})")


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
