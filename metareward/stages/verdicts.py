"""Forced verdicts: a judgment or meta-judgment whose verdict does not parse is cut before its last
(partial) verdict line and completed with the model's own pick among the verdict's options, scored
by `engine.choose` at the judge's temperature (status `forced`). Only the judge's own text is ever
parsed: the prompt and the response it judged are not in that column (a response that says
"Score: 5" is not a score)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from metareward import parsing
from metareward.engines.base import Conversation, Engine
from metareward.prompts import SCORE_OPTIONS, SCORE_PREFIX, WINNER_OPTIONS, WINNER_PREFIX
from metareward.schema import STATUS, STATUS_FORCED, STATUS_OK


def force_verdicts(
    engine: Engine,
    conversations: Sequence[Conversation],
    texts: Sequence[str],
    kind: parsing.VerdictKind,
    temperature: float,
    seed: int,
    prefix: str | None = None,
    options: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(chosen option, completed text) for each failed verdict: the text cut before its last
    verdict line, continued with the verdict prefix and the model's own pick among the options.
    `prefix` and `options` default to the spec's (`Score: ` with "0".."5", `Winner: Judgement`
    with " A" / " B"); the evaluation passes its own comparison prompt's."""
    default_prefix, default_options = (SCORE_PREFIX, SCORE_OPTIONS) if kind == "score" else (WINNER_PREFIX, WINNER_OPTIONS)
    prefix = default_prefix if prefix is None else prefix
    options = default_options if options is None else options
    rationales = [parsing.cut_before_verdict(text, kind) for text in texts]
    continued = [
        [*conversation, {"role": "assistant", "content": rationale}]
        for conversation, rationale in zip(conversations, rationales)
    ]
    picked = [choice.option for choice in engine.choose(continued, prefix, options, temperature, seed=seed)]
    return picked, [rationale + prefix + option for rationale, option in zip(rationales, picked)]


def force_failed_rows(
    table: pd.DataFrame,
    engine: Callable[[], Engine],
    conversations: Sequence[Conversation],
    *,
    text: str,
    verdict: str,
    kind: parsing.VerdictKind,
    verdict_of: Callable[[str], object],
    temperature: float,
    seed: int,
) -> None:
    """In `table` (a RangeIndex, a `status` column), force the verdict of every row whose status is
    not `ok`: its `text` column completed, its `verdict` column set to `verdict_of(option)`, its
    status `forced`. `conversations[row]` is the prompt row `row` answered. Loads no engine when
    every verdict parsed."""
    failed = np.flatnonzero((table[STATUS] != STATUS_OK).to_numpy())
    if not len(failed):
        return
    options, texts = force_verdicts(
        engine(), [conversations[row] for row in failed], table[text].to_numpy()[failed].tolist(), kind, temperature, seed
    )
    table.loc[failed, text] = texts
    table.loc[failed, verdict] = [verdict_of(option) for option in options]
    table.loc[failed, STATUS] = STATUS_FORCED
