"""The prompts the win rate is measured on: the held-out slice of the run's prompt pool, checked
against every prompt the run sampled for training (an overlap raises `HeldOutOverlapError`)."""

from __future__ import annotations

import pandas as pd

from metareward import prompt_sources
from metareward.config import RunConfig
from metareward.schema import PROMPT, PROMPT_ID
from metareward.storage import Store, is_complete, read_artifact


class HeldOutOverlapError(ValueError):
    """A held-out prompt was also sampled for training: the evaluation would measure memorisation."""


def training_prompts(store: Store, run: str) -> dict[int, pd.DataFrame]:
    """The prompts each iteration of `run` sampled for training (its complete `prompts` artifacts)."""
    found = {}
    for iteration in store.list_iterations(run):
        uri = store.stage_uri(run, iteration, "prompts")
        if is_complete(store, uri):
            found[iteration] = read_artifact(store, uri)
    return found


def check_heldout(heldout: pd.DataFrame, sampled: dict[int, pd.DataFrame]) -> None:
    """Raise `HeldOutOverlapError` when a held-out prompt (by id or by text) is among the prompts an
    iteration sampled for training, naming the iterations and prompt ids."""
    ids, texts = set(heldout[PROMPT_ID].astype(str)), set(heldout[PROMPT])
    overlaps = []
    for iteration, prompts in sorted(sampled.items()):
        hit = prompts[prompts[PROMPT_ID].astype(str).isin(ids) | prompts[PROMPT].isin(texts)]
        if len(hit):
            shown = ", ".join(hit[PROMPT_ID].astype(str).head(5)) + (", ..." if len(hit) > 5 else "")
            overlaps.append(f"iteration {iteration}: {len(hit)} prompt(s) ({shown})")
    if overlaps:
        raise HeldOutOverlapError(
            "held-out prompts were sampled for training, so they cannot evaluate the run: "
            + "; ".join(overlaps)
            + ". Was prompts.source, prompts.holdout_fraction or seed changed after training began?"
        )


def heldout_eval_prompts(store: Store, config: RunConfig) -> pd.DataFrame:
    """The first `evaluation.max_prompts` prompts of the run's held-out slice (columns `prompt_id`,
    `prompt`), after checking that no iteration in storage sampled any held-out prompt for training."""
    pool = prompt_sources.load_prompt_pool(config.prompts.source, store=store)
    heldout = prompt_sources.heldout_prompts(pool, config.seed, config.prompts.holdout_fraction)
    if heldout.empty:
        raise ValueError(
            f"prompts.holdout_fraction is {config.prompts.holdout_fraction}: the run has no held-out prompts to evaluate on"
        )
    check_heldout(heldout, training_prompts(store, config.name))
    return heldout.head(config.evaluation.max_prompts).reset_index(drop=True)
