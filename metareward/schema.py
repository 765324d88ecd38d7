"""The artifact schema: column names, status values and input checks (see `docs/artifacts.md`).

Every table the pipeline writes is a pandas DataFrame whose columns are named here; the core
functions check the columns they need with the validators below, and a failed check raises
`SchemaError` (a `ValueError`) naming the table, the column and the offending value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Real

import numpy as np
import pandas as pd

from metareward.hashing import prompt_id_of

SCHEMA_VERSION = 1
"""Bumped whenever a column is renamed, removed or changes meaning."""

# --- column names -------------------------------------------------------------------------
PROMPT_ID = "prompt_id"
PROMPT = "prompt"
RESPONSE_ID = "response_id"
RESPONSE = "response"
N_TOKENS = "n_tokens"
FINISH_REASON = "finish_reason"
JUDGMENT_ID = "judgment_id"
JUDGMENT = "judgment"
SCORE = "score"
STATUS = "status"
SCORE_MEAN = "score_mean"
SCORE_VAR = "score_var"
N_VALID = "n_valid"
JUDGMENT_A_ID = "judgment_a_id"
JUDGMENT_B_ID = "judgment_b_id"
META_JUDGMENT = "meta_judgment"
WINNER = "winner"
ELO = "elo"
KIND = "kind"
CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_ID = "chosen_id"
REJECTED_ID = "rejected_id"
CHOSEN_SCORE = "chosen_score"
REJECTED_SCORE = "rejected_score"
CHOSEN_CHARS = "chosen_chars"
REJECTED_CHARS = "rejected_chars"
CHOSEN_ELO = "chosen_elo"
REJECTED_ELO = "rejected_elo"

# --- tables (artifact column order) -------------------------------------------------------
PROMPTS_COLUMNS = (PROMPT_ID, PROMPT)
RESPONSES_COLUMNS = (PROMPT_ID, RESPONSE_ID, RESPONSE, N_TOKENS, FINISH_REASON)
JUDGMENTS_COLUMNS = (PROMPT_ID, RESPONSE_ID, JUDGMENT_ID, JUDGMENT, SCORE, STATUS, FINISH_REASON)
SCORES_COLUMNS = (PROMPT_ID, RESPONSE_ID, SCORE_MEAN, SCORE_VAR, N_VALID)
META_TARGETS_COLUMNS = SCORES_COLUMNS
COMPARISONS_COLUMNS = (PROMPT_ID, RESPONSE_ID, JUDGMENT_A_ID, JUDGMENT_B_ID)
META_JUDGMENTS_COLUMNS = (PROMPT_ID, RESPONSE_ID, JUDGMENT_A_ID, JUDGMENT_B_ID, META_JUDGMENT, WINNER, STATUS)
ELO_COLUMNS = (PROMPT_ID, RESPONSE_ID, JUDGMENT_ID, ELO)
PAIRS_COLUMNS = (
    KIND,
    PROMPT_ID,
    PROMPT,
    CHOSEN,
    REJECTED,
    CHOSEN_ID,
    REJECTED_ID,
    CHOSEN_SCORE,
    REJECTED_SCORE,
    CHOSEN_CHARS,
    REJECTED_CHARS,
    CHOSEN_ELO,
    REJECTED_ELO,
)

# --- values ---------------------------------------------------------------------------------
STATUS_OK = "ok"
STATUS_FORCED = "forced"
STATUS_NO_SCORE = "no_score"
STATUS_OUT_OF_RANGE = "out_of_range"
STATUS_NO_VERDICT = "no_verdict"
JUDGMENT_STATUSES = (STATUS_OK, STATUS_FORCED, STATUS_NO_SCORE, STATUS_OUT_OF_RANGE)
META_STATUSES = (STATUS_OK, STATUS_FORCED, STATUS_NO_VERDICT)
VALID_STATUSES = (STATUS_OK, STATUS_FORCED)
"""Statuses whose verdict counts everywhere (means, variances, Elo, pairs)."""
WINNERS = ("A", "B")
KIND_ACTOR = "actor"
KIND_JUDGE = "judge"


class SchemaError(ValueError):
    """A table does not follow the artifact schema; the message names the column and value."""


def show(value: object) -> str:
    """repr of a table value for messages: numpy scalars as plain Python values, tuples item by item."""
    if isinstance(value, tuple):
        return "(" + ", ".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def require_columns(table: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    """Raise when `table` (called `name` in the message) lacks any of `columns`."""
    if not isinstance(table, pd.DataFrame):
        raise SchemaError(f"{name}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise SchemaError(
            f"{name}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"it has {', '.join(repr(c) for c in table.columns) or 'no columns'}"
        )


def require_unique(table: pd.DataFrame, columns: str | Sequence[str], name: str) -> None:
    """Raise when a value (or a combination of values) of `columns` occurs on more than one row."""
    subset = [columns] if isinstance(columns, str) else list(columns)
    # Integer codes instead of hashing the strings of several columns together (much faster on Arrow strings).
    combined = np.zeros(len(table), dtype=np.int64)
    for column in subset:
        codes, uniques = pd.factorize(table[column])
        combined = combined * (len(uniques) + 1) + codes + 1
    duplicated = pd.Series(combined).duplicated(keep=False).to_numpy()
    if duplicated.any():
        first = int(duplicated.argmax())
        values = table[subset].iloc[first]
        value = values.iloc[0] if len(subset) == 1 else tuple(values)
        label = repr(subset[0]) if len(subset) == 1 else repr(tuple(subset))
        raise SchemaError(
            f"{name}: column {label} must be unique; {show(value)} occurs on "
            f"{int((combined == combined[first]).sum())} rows"
        )


def require_no_nulls(table: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    """Raise when any of `columns` holds a null value."""
    for column in columns:
        nulls = table[column].isna()
        if nulls.any():
            row = table.index[nulls.to_numpy()][0]
            raise SchemaError(f"{name}: column {column!r} has {int(nulls.sum())} null value(s), first at row {show(row)}")


def require_values(table: pd.DataFrame, column: str, allowed: Sequence[str], name: str, *, allow_null: bool = False) -> None:
    """Raise when `column` holds a value outside `allowed` (nulls only when `allow_null`)."""
    values = table[column]
    bad = ~values.isin(list(allowed))
    if allow_null:
        bad &= values.notna()
    if bad.any():
        value = values[bad.to_numpy()].iloc[0]
        raise SchemaError(f"{name}: column {column!r} has value {show(value)}; allowed: {', '.join(map(repr, allowed))}")


def check_rho(rho: float) -> float:
    """The length-control tier width: a real number in [0, 0.5)."""
    if isinstance(rho, bool) or not isinstance(rho, Real) or math.isnan(rho) or not 0 <= rho < 0.5:
        raise SchemaError(f"rho must be a number in [0, 0.5), got {rho!r}")
    return float(rho)


def check_judgments(judgments: pd.DataFrame, name: str = "judgments") -> None:
    """The columns the core reads from a judgments table, unique `judgment_id`, known statuses, and
    a score exactly on the rows whose status is valid (ok, forced)."""
    require_columns(judgments, (PROMPT_ID, RESPONSE_ID, JUDGMENT_ID, SCORE, STATUS), name)
    require_no_nulls(judgments, (PROMPT_ID, RESPONSE_ID, JUDGMENT_ID, STATUS), name)
    require_unique(judgments, JUDGMENT_ID, name)
    require_values(judgments, STATUS, JUDGMENT_STATUSES, name)
    valid = judgments[STATUS].isin(VALID_STATUSES).to_numpy()
    scored = judgments[SCORE].notna().to_numpy()
    if (valid != scored).any():
        row = judgments.iloc[int((valid != scored).argmax())]
        raise SchemaError(
            f"{name}: judgment_id {show(row[JUDGMENT_ID])} has status {show(row[STATUS])} and score {show(row[SCORE])}; "
            f"a score is required exactly when the status is one of {', '.join(map(repr, VALID_STATUSES))}"
        )
    _check_one_prompt_per_response(judgments, name)


def check_meta_judgments(meta_judgments: pd.DataFrame, name: str = "meta_judgments") -> None:
    """The columns the core reads from a meta-judgments table, known statuses and winners, a winner
    exactly on the rows whose status is valid, two different judgments per row, and each ordered
    pair (judgment_a_id, judgment_b_id) at most once."""
    require_columns(meta_judgments, (PROMPT_ID, RESPONSE_ID, JUDGMENT_A_ID, JUDGMENT_B_ID, WINNER, STATUS), name)
    require_no_nulls(meta_judgments, (PROMPT_ID, RESPONSE_ID, JUDGMENT_A_ID, JUDGMENT_B_ID, STATUS), name)
    require_values(meta_judgments, STATUS, META_STATUSES, name)
    require_values(meta_judgments, WINNER, WINNERS, name, allow_null=True)
    valid = meta_judgments[STATUS].isin(VALID_STATUSES).to_numpy()
    decided = meta_judgments[WINNER].notna().to_numpy()
    if (valid != decided).any():
        row = meta_judgments.iloc[int((valid != decided).argmax())]
        raise SchemaError(
            f"{name}: comparison ({show(row[JUDGMENT_A_ID])}, {show(row[JUDGMENT_B_ID])}) has status {show(row[STATUS])} and "
            f"winner {show(row[WINNER])}; a winner is required exactly when the status is one of "
            f"{', '.join(map(repr, VALID_STATUSES))}"
        )
    same = (meta_judgments[JUDGMENT_A_ID] == meta_judgments[JUDGMENT_B_ID]).to_numpy()
    if same.any():
        value = meta_judgments[JUDGMENT_A_ID].to_numpy()[same][0]
        raise SchemaError(f"{name}: judgment {show(value)} is compared with itself (judgment_a_id == judgment_b_id)")
    require_unique(meta_judgments, (JUDGMENT_A_ID, JUDGMENT_B_ID), name)
    _check_one_prompt_per_response(meta_judgments, name)


def _check_one_prompt_per_response(table: pd.DataFrame, name: str) -> None:
    response_codes, responses = pd.factorize(table[RESPONSE_ID])
    prompt_codes, _ = pd.factorize(table[PROMPT_ID])
    # Any one prompt code per response; a response under two prompts disagrees with it on some row.
    prompt_of_response = np.empty(len(responses), dtype=np.int64)
    prompt_of_response[response_codes] = prompt_codes
    disagree = prompt_of_response[response_codes] != prompt_codes
    if disagree.any():
        response_id = responses[response_codes[int(disagree.argmax())]]
        raise SchemaError(f"{name}: response_id {show(response_id)} appears under more than one prompt_id")


def prepare_prompts(prompts: pd.DataFrame, name: str = "prompts") -> pd.DataFrame:
    """A user's prompt table as the artifact `prompts` (prompt_id, prompt; other columns kept).

    `prompt_id` is the table's own column when present (as str), otherwise `prompt_id_of(prompt)`,
    a stable hash of the text. Prompts must be non-null and prompt ids unique (identical texts
    without their own ids hash to the same id and are refused, naming the id)."""
    require_columns(prompts, (PROMPT,), name)
    require_no_nulls(prompts, (PROMPT,), name)
    prepared = prompts.copy()
    if PROMPT_ID in prepared.columns:
        require_no_nulls(prepared, (PROMPT_ID,), name)
        prepared[PROMPT_ID] = prepared[PROMPT_ID].astype(str)
    else:
        prepared.insert(0, PROMPT_ID, [prompt_id_of(text) for text in prepared[PROMPT]])
    require_unique(prepared, PROMPT_ID, name)
    ordered = [PROMPT_ID, PROMPT] + [c for c in prepared.columns if c not in (PROMPT_ID, PROMPT)]
    return prepared[ordered]
