"""Actor preference pairs with length control (the paper's rule; docs/method.md).

For one prompt, with S_k the mean score of response k (unscored responses left out) and rho in
[0, 0.5):
- top tier: S_k >= (1 - rho) * S_max + rho * S_min; chosen = the shortest response there;
- bottom tier: S_k <= (1 - rho) * S_min + rho * S_max; rejected = the longest response there;
- ties in length go to the smaller `tie_break_key(seed, response_id)`;
- the prompt gives no pair (reason counted in `pairs.attrs["dropped"]`), checked in this order:
  fewer_than_2_scored, all_scores_equal, same_text (chosen and rejected texts are identical),
  chosen_not_better (S(chosen) <= S(rejected)), chosen_too_long (chosen response longer than
  `max_chosen_chars` characters).
Tier bounds are compared with a tolerance of TIER_TOLERANCE, so a score that lies on a bound
(up to float rounding of the bound) is inside the tier.

Everything runs on whole tables (sorts and group reductions), never a loop per prompt.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from metareward.hashing import tie_break_keys
from metareward.schema import (
    CHOSEN,
    CHOSEN_CHARS,
    CHOSEN_ELO,
    CHOSEN_ID,
    CHOSEN_SCORE,
    KIND,
    KIND_ACTOR,
    N_TOKENS,
    PAIRS_COLUMNS,
    PROMPT,
    PROMPT_ID,
    REJECTED,
    REJECTED_CHARS,
    REJECTED_ELO,
    REJECTED_ID,
    REJECTED_SCORE,
    RESPONSE,
    RESPONSE_ID,
    SCORE,
    SchemaError,
    show,
    check_rho,
    require_columns,
    require_no_nulls,
    require_unique,
)

TIER_TOLERANCE = 1e-9
"""Absolute slack on the tier bounds: scores are means of a few decimals, far coarser than this."""

ACTOR_DROP_REASONS = ("fewer_than_2_scored", "all_scores_equal", "same_text", "chosen_not_better", "chosen_too_long")


def select_actor_pairs(
    responses: pd.DataFrame,
    rho: float,
    *,
    max_chosen_chars: int | None = None,
    length: Literal["chars", "tokens"] = "chars",
    prompts: pd.DataFrame | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The actor pairs: at most one row per prompt of `responses`, columns PAIRS_COLUMNS
    (kind 'actor', chosen_elo/rejected_elo null), sorted by prompt_id.

    responses: prompt_id, response_id (unique), response, score (the mean of the valid judgments,
        null when none), plus n_tokens when `length="tokens"`.
    rho: the tier width, in [0, 0.5); 0 gives best vs worst.
    max_chosen_chars: drop the pair when the chosen response is longer (in characters); None: no cap.
    length: what "shortest"/"longest" measure: `chars` (Unicode code points) or `tokens` (n_tokens).
    prompts: prompt_id, prompt: the user prompt texts for the `prompt` column. When omitted,
        `responses` must carry a `prompt` column instead.
    seed: seeds the tie-break keys.

    `result.attrs["dropped"]` maps each reason of ACTOR_DROP_REASONS to the number of prompts it
    removed; selected + dropped = the number of distinct prompt_ids in `responses`.
    """
    rho = check_rho(rho)
    if length not in ("chars", "tokens"):
        raise SchemaError(f"length must be 'chars' or 'tokens', got {length!r}")
    if max_chosen_chars is not None and (isinstance(max_chosen_chars, bool) or not isinstance(max_chosen_chars, (int, np.integer)) or max_chosen_chars < 0):
        raise SchemaError(f"max_chosen_chars must be a non-negative int or None, got {max_chosen_chars!r}")
    needed = [PROMPT_ID, RESPONSE_ID, RESPONSE, SCORE] + ([N_TOKENS] if length == "tokens" else [])
    require_columns(responses, needed, "responses")
    require_no_nulls(responses, [PROMPT_ID, RESPONSE_ID, RESPONSE] + ([N_TOKENS] if length == "tokens" else []), "responses")
    require_unique(responses, RESPONSE_ID, "responses")
    prompt_text = _prompt_texts(responses, prompts)

    prompt_codes, prompt_ids = pd.factorize(responses[PROMPT_ID], sort=True)
    n_prompts = len(prompt_ids)
    scores = pd.to_numeric(responses[SCORE], errors="raise").to_numpy(dtype=np.float64)
    scored = ~np.isnan(scores)
    texts = responses[RESPONSE]
    chars = texts.str.len().to_numpy(dtype=np.int64)
    sizes = responses[N_TOKENS].to_numpy(dtype=np.int64) if length == "tokens" else chars

    rows = np.flatnonzero(scored)
    codes, row_scores = prompt_codes[rows], scores[rows]
    n_scored = np.bincount(codes, minlength=n_prompts)
    s_max = np.full(n_prompts, -np.inf)
    s_min = np.full(n_prompts, np.inf)
    np.maximum.at(s_max, codes, row_scores)
    np.minimum.at(s_min, codes, row_scores)
    s_max[n_scored == 0] = s_min[n_scored == 0] = 0.0  # finite bounds; such prompts are dropped anyway
    top_bound = (1 - rho) * s_max + rho * s_min
    bottom_bound = (1 - rho) * s_min + rho * s_max
    in_top = row_scores >= top_bound[codes] - TIER_TOLERANCE
    in_bottom = row_scores <= bottom_bound[codes] + TIER_TOLERANCE

    keys = np.zeros(len(rows), dtype=np.uint64)  # hashed only where a tier can need them
    in_a_tier = in_top | in_bottom
    keys[in_a_tier] = tie_break_keys(seed, responses[RESPONSE_ID].to_numpy()[rows[in_a_tier]])
    row_sizes = sizes[rows]
    chosen_row = first_per_group(codes[in_top], (keys[in_top], row_sizes[in_top]), rows[in_top], n_prompts)
    rejected_row = first_per_group(codes[in_bottom], (keys[in_bottom], -row_sizes[in_bottom]), rows[in_bottom], n_prompts)

    # Drop rules in order; each prompt is counted under the first rule it fails.
    remaining = np.ones(n_prompts, dtype=bool)
    dropped: dict[str, int] = {}

    def drop(reason: str, fails: np.ndarray) -> None:
        fails = fails & remaining
        dropped[reason] = int(fails.sum())
        remaining[fails] = False

    drop("fewer_than_2_scored", n_scored < 2)
    drop("all_scores_equal", s_max == s_min)
    same_text = np.zeros(n_prompts, dtype=bool)
    candidates = np.flatnonzero(remaining)
    same_text[candidates] = texts.take(chosen_row[candidates]).to_numpy() == texts.take(rejected_row[candidates]).to_numpy()
    drop("same_text", same_text)
    not_better = np.zeros(n_prompts, dtype=bool)
    candidates = np.flatnonzero(remaining)
    not_better[candidates] = scores[chosen_row[candidates]] <= scores[rejected_row[candidates]]
    drop("chosen_not_better", not_better)
    too_long = np.zeros(n_prompts, dtype=bool)
    if max_chosen_chars is not None:
        candidates = np.flatnonzero(remaining)
        too_long[candidates] = chars[chosen_row[candidates]] > max_chosen_chars
    drop("chosen_too_long", too_long)

    selected = np.flatnonzero(remaining)
    chosen, rejected = chosen_row[selected], rejected_row[selected]
    response_ids = responses[RESPONSE_ID].to_numpy()
    selected_prompt_ids = prompt_ids.to_numpy()[selected]
    pairs = pd.DataFrame(
        {
            KIND: pd.array([KIND_ACTOR] * len(selected), dtype="str"),
            PROMPT_ID: selected_prompt_ids,
            PROMPT: prompt_text.reindex(selected_prompt_ids).to_numpy(),
            CHOSEN: texts.take(chosen).to_numpy(),
            REJECTED: texts.take(rejected).to_numpy(),
            CHOSEN_ID: response_ids[chosen],
            REJECTED_ID: response_ids[rejected],
            CHOSEN_SCORE: scores[chosen],
            REJECTED_SCORE: scores[rejected],
            CHOSEN_CHARS: chars[chosen],
            REJECTED_CHARS: chars[rejected],
            CHOSEN_ELO: np.full(len(selected), np.nan),
            REJECTED_ELO: np.full(len(selected), np.nan),
        },
        columns=list(PAIRS_COLUMNS),
    )
    pairs.attrs["dropped"] = dropped
    return pairs


def drop_duplicate_responses(responses: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Keep one response per exact (prompt_id, response text): the one with the smallest
    `tie_break_key(seed, response_id)`, whatever the row order. Rows keep their input order;
    `result.attrs["dropped"]` = {"duplicate_text": number of rows removed}."""
    require_columns(responses, (PROMPT_ID, RESPONSE_ID, RESPONSE), "responses")
    require_no_nulls(responses, (PROMPT_ID, RESPONSE_ID, RESPONSE), "responses")
    require_unique(responses, RESPONSE_ID, "responses")
    keyed = responses[[PROMPT_ID, RESPONSE]].assign(_key=tie_break_keys(seed, responses[RESPONSE_ID].to_numpy()))
    duplicate = keyed.sort_values("_key", kind="stable").duplicated([PROMPT_ID, RESPONSE]).reindex(responses.index)
    kept = responses.loc[~duplicate.to_numpy()].copy()
    kept.attrs["dropped"] = {"duplicate_text": int(duplicate.sum())}
    return kept


def _prompt_texts(responses: pd.DataFrame, prompts: pd.DataFrame | None) -> pd.Series:
    """prompt text by prompt_id, for every prompt of `responses`."""
    if prompts is None:
        if PROMPT not in responses.columns:
            raise SchemaError(
                "responses: missing column 'prompt'; pass prompts= (a table with prompt_id, prompt) "
                "or add the user prompt texts as a 'prompt' column"
            )
        source, name = responses, "responses"
    else:
        require_columns(prompts, (PROMPT_ID, PROMPT), "prompts")
        require_unique(prompts, PROMPT_ID, "prompts")
        source, name = prompts, "prompts"
    require_no_nulls(source, (PROMPT,), name)
    text = source.drop_duplicates(PROMPT_ID).set_index(PROMPT_ID)[PROMPT]
    if prompts is None:
        conflicting = responses.groupby(PROMPT_ID, sort=False)[PROMPT].nunique()
        if (conflicting > 1).any():
            raise SchemaError(f"responses: prompt_id {show(conflicting.index[(conflicting > 1).to_numpy()][0])} has more than one 'prompt' text")
    missing = text.index.get_indexer(responses[PROMPT_ID]) < 0
    if missing.any():
        raise SchemaError(f"prompts: no prompt text for prompt_id {show(responses[PROMPT_ID].to_numpy()[missing][0])}")
    return text


def first_per_group(codes: np.ndarray, sort_keys: tuple[np.ndarray, ...], rows: np.ndarray, n_groups: int) -> np.ndarray:
    """For each group code in range(n_groups), the entry of `rows` that sorts first by
    `sort_keys` (last key most significant, as in np.lexsort); -1 for a group without rows.
    The selection rules of this module and of `metareward.meta` share it."""
    order = np.lexsort(sort_keys + (codes,))
    sorted_codes = codes[order]
    first = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]] if len(order) else np.zeros(0, dtype=bool)
    best = np.full(n_groups, -1, dtype=np.int64)
    best[sorted_codes[first]] = rows[order[first]]
    return best
