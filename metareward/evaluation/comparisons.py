"""The win rate's comparisons: each model's responses to the held-out prompts, and the judge's
verdicts on each pair of them in both orders.

Win rate (`evaluate_win_rate`): model X (default M_i) and model Y (default M_{i-1}) each answer the
run's held-out prompts (`heldout_eval_prompts`: the held-out slice of the pool, checked against every
prompt the run sampled for training; an overlap raises `HeldOutOverlapError`). A fixed judge (default
the run's seed model M0; any engine, e.g. a stronger model behind an OpenAI-compatible server)
compares the two answers with `COMPARISON_TEMPLATE`, once with X's answer as Response A and once
with it as Response B. The verdict is the last "Winner: A" / "Winner: B" line of the judge's text;
with `verdict_mode: forced` a comparison without one is cut before its verdict line and completed
with the judge's own sampled choice between " A" and " B" after "Winner:" (status `forced`), so
every comparison gets a verdict. There are no ties in a verdict; a prompt whose two orders
disagree is a tie in effect (one win each).
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd

from metareward.config import EvaluationConfig
from metareward.engines.base import Engine, Sampling
from metareward.hashing import tie_break_key
from metareward.schema import (
    FINISH_REASON,
    N_TOKENS,
    PROMPT,
    PROMPT_ID,
    RESPONSE,
    STATUS,
    STATUS_FORCED,
    STATUS_NO_VERDICT,
    STATUS_OK,
)
from metareward.stages import force_verdicts


# The two models compared: X (the model under test) and Y (its baseline).
MODEL_X, MODEL_Y = "x", "y"
ORDER_X_FIRST, ORDER_Y_FIRST = "x_first", "y_first"

COMPARISON_TEMPLATE = """Compare two responses to the user's instruction below and decide which one is better.
A better response follows the instruction, is correct, answers everything that was asked, and is
clear. Judge the content only: the order in which the responses are shown must not matter, and a
longer response is not better unless what it adds makes it more helpful.

Instruction: {prompt}

<response_a>
{response_a}
</response_a>

<response_b>
{response_b}
</response_b>

After reading the instruction and both responses:
- Briefly explain which response is better and why, in up to 100 words.
- Conclude with your verdict using the format: "Winner: A" or "Winner: B\""""
"""Slots: {prompt}, {response_a}, {response_b}. One user turn."""

VERDICT_PREFIX = "Winner:"
VERDICT_OPTIONS = (" A", " B")
_VERDICT_OF_OPTION = {" A": "A", " B": "B"}
# The last "Winner:" of the text followed by a lone label A or B ("Winner: **B**", "winner: [A]",
# "Winner: Response A"); "Winner: A or B" (the format echoed) names two labels and is no verdict.
_LAST_VERDICT_LINE = re.compile(r".*\bwinner[\s*_]*:[ \t*_]*(?:\n\s*)?([^\n]*)", re.IGNORECASE | re.ASCII | re.DOTALL)
_VERDICT_LABEL = re.compile(r"^[\s*_\"'\[(]*(?:response\s+)?([AB])\b(.*)$", re.IGNORECASE | re.ASCII)
_SECOND_LABEL = re.compile(r"\b(?:or|and|\|)\s*(?:response\s+)?[AB]\b|\|", re.IGNORECASE | re.ASCII)

COMPARISONS_COLUMNS = (PROMPT_ID, "order", "judgment", "verdict", STATUS, "winner", "x_chars", "y_chars")
COMPARISON_STATUSES = (STATUS_OK, STATUS_FORCED, STATUS_NO_VERDICT)


def render_comparison_prompt(prompt: str, response_a: str, response_b: str) -> str:
    """The judge's user turn comparing two responses to one instruction (slot values inserted as they are)."""
    for slot, value in (("prompt", prompt), ("response_a", response_a), ("response_b", response_b)):
        if not isinstance(value, str):
            raise TypeError(f"{slot} must be a str, got {type(value).__name__}: {value!r}")
    return COMPARISON_TEMPLATE.format(prompt=prompt, response_a=response_a, response_b=response_b)


def parse_comparison_verdict(text: str | None) -> Literal["A", "B"] | None:
    """'A' or 'B' from the last `Winner:` line of a comparison (the label may be written `Response A`,
    in any case, with markdown around it); None when there is none, or the line names both labels."""
    if not isinstance(text, str):
        return None
    line = _LAST_VERDICT_LINE.match(text)
    if line is None:
        return None
    label = _VERDICT_LABEL.match(line.group(1))
    if label is None or _SECOND_LABEL.search(label.group(2)):
        return None
    return label.group(1).upper()  # type: ignore[return-value]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _seed(seed: int, purpose: str) -> int:
    return tie_break_key(seed, f"evaluation/{purpose}") % 2**31


def generate_responses(engine: Engine, prompts: pd.DataFrame, settings: EvaluationConfig, seed: int) -> pd.DataFrame:
    """One response per prompt: columns `prompt_id`, `response`, `n_tokens`, `finish_reason`."""
    sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens, seed=seed)
    completions = engine.generate([_user(text) for text in prompts[PROMPT]], sampling, n=1)
    return pd.DataFrame(
        {
            PROMPT_ID: prompts[PROMPT_ID].astype(str).to_numpy(),
            RESPONSE: [samples[0].text for samples in completions],
            N_TOKENS: np.array([samples[0].n_tokens for samples in completions], dtype=np.int64),
            FINISH_REASON: [samples[0].finish_reason for samples in completions],
        }
    )


def winner_of(order: str, verdict: str | None) -> str | None:
    """Which model a verdict names: X when it picked the slot X's response was shown in."""
    if order not in (ORDER_X_FIRST, ORDER_Y_FIRST):
        raise ValueError(f"order must be {ORDER_X_FIRST!r} or {ORDER_Y_FIRST!r}, got {order!r}")
    if verdict not in ("A", "B"):
        return None
    x_slot = "A" if order == ORDER_X_FIRST else "B"
    return MODEL_X if verdict == x_slot else MODEL_Y


def compare_responses(
    engine: Engine,
    prompts: pd.DataFrame,
    responses_x: pd.DataFrame,
    responses_y: pd.DataFrame,
    settings: EvaluationConfig,
    seed: int,
) -> pd.DataFrame:
    """The judge compares X's and Y's response to every prompt in both orders. Columns
    `COMPARISONS_COLUMNS`: `order` (`x_first`: X's response is Response A), the judge's text,
    `verdict` (A, B or null), `status` (ok, forced, no_verdict), `winner` (x, y or null) and both
    responses' lengths in characters."""
    text_x = dict(zip(responses_x[PROMPT_ID], responses_x[RESPONSE]))
    text_y = dict(zip(responses_y[PROMPT_ID], responses_y[RESPONSE]))
    rows, conversations = [], []
    for prompt_id, prompt in zip(prompts[PROMPT_ID].astype(str), prompts[PROMPT]):
        x, y = text_x[prompt_id], text_y[prompt_id]
        for order, (a, b) in ((ORDER_X_FIRST, (x, y)), (ORDER_Y_FIRST, (y, x))):
            rows.append({PROMPT_ID: prompt_id, "order": order, "x_chars": len(x), "y_chars": len(y)})
            conversations.append(_user(render_comparison_prompt(prompt, a, b)))
    table = pd.DataFrame(rows, columns=[PROMPT_ID, "order", "x_chars", "y_chars"])
    sampling = Sampling(
        temperature=settings.judge_temperature, top_p=1.0, max_tokens=settings.judge_max_tokens, seed=_seed(seed, "compare")
    )
    texts = [samples[0].text for samples in engine.generate(conversations, sampling, n=1)] if conversations else []
    verdicts = [parse_comparison_verdict(text) for text in texts]
    statuses = [STATUS_OK if verdict else STATUS_NO_VERDICT for verdict in verdicts]
    if settings.verdict_mode == "forced":
        failed = [row for row, verdict in enumerate(verdicts) if verdict is None]
        if failed:
            options, completed = force_verdicts(
                engine,
                [conversations[row] for row in failed],
                [texts[row] for row in failed],
                "winner",
                settings.judge_temperature,
                _seed(seed, "compare/forced"),
                prefix=VERDICT_PREFIX,
                options=VERDICT_OPTIONS,
            )
            for row, option, text in zip(failed, options, completed):
                texts[row], verdicts[row], statuses[row] = text, _VERDICT_OF_OPTION[option], STATUS_FORCED
    table["judgment"] = texts
    table["verdict"] = pd.array(verdicts, dtype="str")
    table[STATUS] = statuses
    table["winner"] = pd.array([winner_of(order, verdict) for order, verdict in zip(table["order"], verdicts)], dtype="str")
    return table[list(COMPARISONS_COLUMNS)].astype({"x_chars": "int64", "y_chars": "int64"})
