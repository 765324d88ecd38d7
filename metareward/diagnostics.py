"""Diagnostics of one iteration: can its judge, meta-judge and training be trusted? (pure pandas/numpy)

Self-rewarding loops fail in known ways: the judge's scores drift to 5 (score inflation), responses
grow longer, the meta-judge prefers Judgment A, the judgment with the higher score or the longer
one, judges write text without a parsable verdict. `iteration_metrics` turns an iteration's
tables into one row of numbers that shows each of these; `iteration_histograms` gives the
distributions behind them. What each metric means and how to read it: `docs/diagnostics.md`.

Inputs are the artifacts of `docs/artifacts.md` (`IterationTables`); a table the iteration did
not write is None (no meta-judge in an iteration that trains no judge pairs, no `train` table when
nothing was trained) and gives null metrics, never an error. A metric whose denominator is zero
(a position bias without any decided verdict) is null too. Every metric is a column of the row,
whichever tables exist, so rows of several iterations line up.

Reading and writing these from a store, plots and markdown: `metareward.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from metareward import meta
from metareward.pairs import ACTOR_DROP_REASONS, TIER_TOLERANCE
from metareward.schema import (
    CHOSEN_CHARS,
    CHOSEN_SCORE,
    ELO,
    FINISH_REASON,
    JUDGMENT,
    JUDGMENT_A_ID,
    JUDGMENT_B_ID,
    JUDGMENT_ID,
    JUDGMENT_STATUSES,
    META_STATUSES,
    N_TOKENS,
    PROMPT_ID,
    REJECTED_CHARS,
    REJECTED_SCORE,
    RESPONSE,
    RESPONSE_ID,
    SCORE,
    SCORE_MEAN,
    SCORE_VAR,
    STATUS,
    VALID_STATUSES,
    WINNER,
    require_columns,
)

TOP_SCORE = 5.0
"""The rubric's highest score: the share of judgments giving it measures score inflation."""

LENGTH_BINS = 20
"""Bins of the length histograms (characters, tokens), over [0, longest]."""

# Histogram names (the `histogram` column of `iteration_histograms`).
JUDGMENT_SCORE = "judgment_score"
RESPONSE_SCORE = "response_score"
RESPONSE_CHARS = "response_chars"
RESPONSE_TOKENS = "response_tokens"
ACTOR_CHOSEN_CHARS = "actor_chosen_chars"
ACTOR_REJECTED_CHARS = "actor_rejected_chars"
HISTOGRAM_COLUMNS = ("iteration", "histogram", "bin_left", "bin_right", "count")

# Scores lie on 0-5, integers at first and fractions such as 4.5 and 4.75 from trained judges (the
# spec), and a response's mean in steps of 1/N: bins of a quarter point centred on 0, 0.25, ..., 5.
_SCORE_EDGES = np.arange(-0.125, TOP_SCORE + 0.25, 0.25)


@dataclass
class IterationTables:
    """An iteration's artifacts (None where the iteration wrote none) and its stages' summaries.

    summaries: each stage's summary by stage name, as in the `summary` artifact (the drops by
        reason come from here: Parquet does not keep `DataFrame.attrs`).
    """

    iteration: int
    responses: pd.DataFrame | None = None
    judgments: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    meta_judgments: pd.DataFrame | None = None
    elo: pd.DataFrame | None = None
    actor_pairs: pd.DataFrame | None = None
    judge_pairs: pd.DataFrame | None = None
    train: pd.DataFrame | None = None
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# helpers


def _share(hits: np.ndarray | pd.Series, of: np.ndarray | pd.Series | None = None) -> float | None:
    """Share of True among `hits` (restricted to `of` when given); None when there is nothing to share."""
    hits = np.asarray(hits, dtype=bool)
    if of is not None:
        hits = hits[np.asarray(of, dtype=bool)]
    return float(hits.mean()) if len(hits) else None


def _mean(values: pd.Series | np.ndarray | None) -> float | None:
    values = pd.Series(values, dtype="float64").dropna() if values is not None else pd.Series(dtype="float64")
    return float(values.mean()) if len(values) else None


def _quantile(values: pd.Series, q: float) -> float | None:
    values = values.dropna()
    return float(values.quantile(q)) if len(values) else None


def _count(table: pd.DataFrame | None) -> Any:
    """Rows of a table; NA (a null count) when the iteration has no such table."""
    return pd.NA if table is None else len(table)


def _status_counts(prefix: str, statuses: pd.Series | None, known: tuple[str, ...]) -> dict[str, Any]:
    """`{prefix}_status_{s}` for every known status (and any other found); NA without a table."""
    if statuses is None:
        return {f"{prefix}_status_{status}": pd.NA for status in known}
    counted = statuses.astype(str).value_counts()
    found = [*known, *sorted(set(counted.index) - set(known))]
    return {f"{prefix}_status_{status}": int(counted.get(status, 0)) for status in found}


def _drops(prefix: str, summary: Mapping[str, Any] | None, known: tuple[str, ...]) -> dict[str, Any]:
    """`{prefix}_dropped_{reason}` from a stage summary's `dropped` counts; NA when the stage did not run."""
    if summary is None:
        return {f"{prefix}_dropped_{reason}": pd.NA for reason in known}
    dropped = summary.get("dropped") or {}
    found = [*known, *sorted(set(dropped) - set(known))]
    return {f"{prefix}_dropped_{reason}": int(dropped.get(reason, 0)) for reason in found}


def _histogram(iteration: int, name: str, values: pd.Series, edges: np.ndarray) -> pd.DataFrame:
    counts, _ = np.histogram(values.dropna().to_numpy(dtype=np.float64), bins=edges)
    return pd.DataFrame(
        {
            "iteration": iteration,
            "histogram": name,
            "bin_left": edges[:-1].astype(np.float64),
            "bin_right": edges[1:].astype(np.float64),
            "count": counts.astype(np.int64),
        }
    )


def _length_edges(values: pd.Series) -> np.ndarray:
    longest = float(values.max()) if len(values.dropna()) else 0.0
    return np.linspace(0.0, max(longest, 1.0), LENGTH_BINS + 1)


# ----------------------------------------------------------------------------------------------
# metrics by role


def judge_metrics(judgments: pd.DataFrame | None, scores: pd.DataFrame | None) -> dict[str, Any]:
    """The judge: status counts by cause, the valid scores' mean, variance and top-score share, the
    mean within-response variance, and the share of prompts whose responses all got the same
    mean score (such a prompt gives no actor pair)."""
    metrics: dict[str, Any] = {"judge_judgments": _count(judgments)}
    metrics |= _status_counts("judge", None if judgments is None else judgments[STATUS], JUDGMENT_STATUSES)
    valid_scores = pd.Series(dtype="float64")
    if judgments is not None:
        require_columns(judgments, (SCORE, STATUS), "judgments")
        valid_scores = judgments.loc[judgments[STATUS].isin(VALID_STATUSES).to_numpy(), SCORE].astype("float64")
    metrics |= {
        "judge_valid_share": _share(judgments[STATUS].isin(VALID_STATUSES)) if judgments is not None else None,
        "judge_score_mean": _mean(valid_scores),
        "judge_score_var": float(valid_scores.var(ddof=0)) if len(valid_scores) else None,
        "judge_top_score_share": _share(valid_scores.to_numpy() >= TOP_SCORE) if judgments is not None else None,
    }

    same = {"judge_response_score_var_mean": None, "judge_prompts_scored": pd.NA, "judge_prompts_all_same": pd.NA, "judge_all_same_share": None}
    if scores is not None:
        require_columns(scores, (PROMPT_ID, SCORE_MEAN, SCORE_VAR), "scores")
        scored = scores[scores[SCORE_MEAN].notna()]
        by_prompt = scored.groupby(PROMPT_ID)[SCORE_MEAN].agg(["size", "min", "max"])
        comparable = by_prompt[by_prompt["size"] >= 2]
        all_same = (comparable["max"] - comparable["min"]) <= TIER_TOLERANCE
        same = {
            "judge_response_score_var_mean": _mean(scores[SCORE_VAR]),
            "judge_prompts_scored": len(comparable),
            "judge_prompts_all_same": int(all_same.sum()),
            "judge_all_same_share": _share(all_same),
        }
    return metrics | same


def actor_metrics(
    responses: pd.DataFrame | None,
    actor_pairs: pd.DataFrame | None,
    generate_summary: Mapping[str, Any] | None,
    actor_pairs_summary: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The actor: response lengths (characters and tokens), truncated share, chosen vs rejected
    length and score of the actor pairs, and the pairs kept and dropped by reason."""
    metrics: dict[str, Any] = {"actor_responses": _count(responses)}
    duplicates = pd.NA
    if generate_summary is not None:
        duplicates = int((generate_summary.get("dropped") or {}).get("duplicate_text", 0))
    metrics["actor_duplicates_dropped"] = duplicates
    for unit, column in (("chars", RESPONSE), ("tokens", N_TOKENS)):
        values = pd.Series(dtype="float64")
        if responses is not None:
            require_columns(responses, (RESPONSE, N_TOKENS, FINISH_REASON), "responses")
            values = (responses[RESPONSE].str.len() if unit == "chars" else responses[column]).astype("float64")
        metrics |= {
            f"actor_{unit}_mean": _mean(values),
            f"actor_{unit}_median": _quantile(values, 0.5),
            f"actor_{unit}_p90": _quantile(values, 0.9),
            f"actor_{unit}_max": float(values.max()) if len(values) else None,
        }
    metrics["actor_truncated_share"] = _share(responses[FINISH_REASON] == "length") if responses is not None else None

    metrics["actor_pairs"] = _count(actor_pairs)
    metrics |= _drops("actor_pairs", actor_pairs_summary, ACTOR_DROP_REASONS)
    metrics |= _pair_sides("actor", actor_pairs)
    return metrics


def _pair_sides(kind: str, pairs: pd.DataFrame | None) -> dict[str, Any]:
    """Mean length and score of the chosen and rejected sides, and the shares where chosen is longer
    / scored higher."""
    if pairs is not None:
        require_columns(pairs, (CHOSEN_CHARS, REJECTED_CHARS, CHOSEN_SCORE, REJECTED_SCORE), f"{kind}_pairs")
    column = (lambda name: pairs[name].astype("float64")) if pairs is not None else (lambda name: None)
    return {
        f"{kind}_chosen_chars_mean": _mean(column(CHOSEN_CHARS)),
        f"{kind}_rejected_chars_mean": _mean(column(REJECTED_CHARS)),
        f"{kind}_chosen_score_mean": _mean(column(CHOSEN_SCORE)),
        f"{kind}_rejected_score_mean": _mean(column(REJECTED_SCORE)),
        f"{kind}_chosen_longer_share": _share(column(CHOSEN_CHARS) > column(REJECTED_CHARS)) if pairs is not None else None,
        f"{kind}_chosen_higher_score_share": _share(column(CHOSEN_SCORE) > column(REJECTED_SCORE)) if pairs is not None else None,
    }


def meta_metrics(
    meta_judgments: pd.DataFrame | None,
    judgments: pd.DataFrame | None,
    elo: pd.DataFrame | None,
    judge_pairs: pd.DataFrame | None,
    meta_judge_summary: Mapping[str, Any] | None,
    judge_pairs_summary: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The meta-judge: verdict status counts, its position, score and length biases, the position
    weights (w1, w2) the Elo used, the Elo spread, and the judge pairs kept and dropped by reason.

    Biases are shares of the decided verdicts (winner A or B): position bias = won by Judgment A;
    score bias = won by the judgment that gave the higher score, among comparisons of judgments
    with different scores; length bias = won by the longer judgment text, among comparisons of
    texts of different lengths. 0.5 is no preference.
    """
    metrics: dict[str, Any] = {"meta_judgments": _count(meta_judgments)}
    metrics |= _status_counts("meta", None if meta_judgments is None else meta_judgments[STATUS], META_STATUSES)
    biases: dict[str, Any] = {
        "meta_decided": pd.NA,
        "meta_position_bias": None,
        "meta_score_bias": None,
        "meta_score_bias_comparisons": pd.NA,
        "meta_length_bias": None,
        "meta_length_bias_comparisons": pd.NA,
        "meta_w1": None,
        "meta_w2": None,
    }
    if meta_judgments is not None:
        meta.check_meta_judgments(meta_judgments)
        decided = meta_judgments[meta_judgments[WINNER].notna().to_numpy()]
        won_by_a = (decided[WINNER] == "A").to_numpy()
        w1, w2 = meta.positional_weights(meta_judgments)
        biases |= {"meta_decided": len(decided), "meta_position_bias": _share(won_by_a), "meta_w1": w1, "meta_w2": w2}
        if judgments is not None:
            require_columns(judgments, (JUDGMENT_ID, JUDGMENT, SCORE), "judgments")
            by_id = judgments.set_index(JUDGMENT_ID)
            score_a = decided[JUDGMENT_A_ID].map(by_id[SCORE]).to_numpy(dtype=np.float64)
            score_b = decided[JUDGMENT_B_ID].map(by_id[SCORE]).to_numpy(dtype=np.float64)
            length = by_id[JUDGMENT].str.len()
            chars_a = decided[JUDGMENT_A_ID].map(length).to_numpy(dtype=np.float64)
            chars_b = decided[JUDGMENT_B_ID].map(length).to_numpy(dtype=np.float64)
            # NaN (a judgment without a valid score, or missing from the table) is neither greater
            # nor smaller: such comparisons count for no bias.
            scores_differ = (score_a > score_b) | (score_b > score_a)
            lengths_differ = (chars_a > chars_b) | (chars_b > chars_a)
            biases |= {
                "meta_score_bias": _share(won_by_a == (score_a > score_b), of=scores_differ),
                "meta_score_bias_comparisons": int(scores_differ.sum()),
                "meta_length_bias": _share(won_by_a == (chars_a > chars_b), of=lengths_differ),
                "meta_length_bias_comparisons": int(lengths_differ.sum()),
            }
    metrics |= biases

    spread = {"meta_elo_spread_mean": None, "meta_elo_spread_max": None}
    if elo is not None:
        require_columns(elo, (RESPONSE_ID, ELO), "elo")
        per_target = elo.groupby(RESPONSE_ID)[ELO].agg(lambda values: values.max() - values.min())
        spread = {"meta_elo_spread_mean": _mean(per_target), "meta_elo_spread_max": float(per_target.max()) if len(per_target) else None}
    metrics |= spread
    metrics["meta_targets"] = pd.NA if meta_judge_summary is None else int(meta_judge_summary["targets"])
    metrics |= _drops("meta_targets", meta_judge_summary, meta.META_TARGET_DROP_REASONS)
    metrics["judge_pairs"] = _count(judge_pairs)
    metrics |= _drops("judge_pairs", judge_pairs_summary, meta.JUDGE_DROP_REASONS)
    metrics |= _pair_sides("judge", judge_pairs)
    return metrics


def train_metrics(train: pd.DataFrame | None, train_summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """Training: whether a model was trained, pairs used, steps, and the last logged loss, reward
    margin and reward accuracy (each the mean over the steps since the previous log)."""
    last = train.iloc[-1] if train is not None and len(train) else None

    def final(column: str) -> float | None:
        return float(last[column]) if last is not None and column in last.index and pd.notna(last[column]) else None

    summary = train_summary or {}
    return {
        "train_trained": bool(summary["trained"]) if "trained" in summary else pd.NA,
        "train_pairs": int(summary["pairs"]) if "pairs" in summary else pd.NA,
        "train_pairs_used": int(summary["pairs_used"]) if "pairs_used" in summary else pd.NA,
        "train_steps": int(last["step"]) if last is not None and "step" in last.index else pd.NA,
        "train_final_loss": final("loss"),
        "train_final_margin": final("rewards/margins"),
        "train_final_accuracy": final("rewards/accuracies"),
    }


# ----------------------------------------------------------------------------------------------
# the iteration


def iteration_metrics(tables: IterationTables) -> pd.DataFrame:
    """One row: `iteration` and every metric of the four roles (see each function), with typed
    columns (counts nullable Int64, shares and means float64, flags nullable boolean)."""
    summaries = tables.summaries
    row: dict[str, Any] = {"iteration": tables.iteration}
    row |= judge_metrics(tables.judgments, tables.scores)
    row |= actor_metrics(tables.responses, tables.actor_pairs, summaries.get("generate"), summaries.get("actor_pairs"))
    row |= meta_metrics(
        tables.meta_judgments, tables.judgments, tables.elo, tables.judge_pairs, summaries.get("meta_judge"), summaries.get("judge_pairs")
    )
    row |= train_metrics(tables.train, summaries.get("train"))
    return _typed_row(row)


_FLAGS = ("train_trained",)


def _typed_row(row: Mapping[str, Any]) -> pd.DataFrame:
    """A one-row frame whose columns keep their type when a value is null (Parquet needs one):
    flags nullable boolean, counts (ints, or NA for a missing count) nullable Int64, the rest float64."""
    columns = {}
    for name, value in row.items():
        if name in _FLAGS:
            columns[name] = pd.array([value], dtype="boolean")
        elif value is pd.NA or isinstance(value, (int, np.integer)):
            columns[name] = pd.array([value], dtype="Int64")
        else:
            columns[name] = pd.array([value], dtype="float64")
    return pd.DataFrame(columns)


def iteration_histograms(tables: IterationTables) -> pd.DataFrame:
    """The distributions behind the metrics, long format (columns HISTOGRAM_COLUMNS): valid judgment
    scores and response mean scores (bins of a quarter point centred on 0, 0.25, ..., 5), response lengths in
    characters and tokens (LENGTH_BINS bins over [0, longest]), and the chosen and rejected actor
    pairs' lengths on the response characters' bins. A table the iteration lacks gives no rows."""
    parts = []
    i = tables.iteration
    if tables.judgments is not None:
        valid = tables.judgments[STATUS].isin(VALID_STATUSES).to_numpy()
        parts.append(_histogram(i, JUDGMENT_SCORE, tables.judgments.loc[valid, SCORE].astype("float64"), _SCORE_EDGES))
    if tables.scores is not None:
        parts.append(_histogram(i, RESPONSE_SCORE, tables.scores[SCORE_MEAN].astype("float64"), _SCORE_EDGES))
    if tables.responses is not None:
        chars = tables.responses[RESPONSE].str.len().astype("float64")
        tokens = tables.responses[N_TOKENS].astype("float64")
        if tables.actor_pairs is not None:
            chars_edges = _length_edges(pd.concat([chars, tables.actor_pairs[CHOSEN_CHARS], tables.actor_pairs[REJECTED_CHARS]]))
        else:
            chars_edges = _length_edges(chars)
        parts.append(_histogram(i, RESPONSE_CHARS, chars, chars_edges))
        parts.append(_histogram(i, RESPONSE_TOKENS, tokens, _length_edges(tokens)))
        if tables.actor_pairs is not None:
            parts.append(_histogram(i, ACTOR_CHOSEN_CHARS, tables.actor_pairs[CHOSEN_CHARS].astype("float64"), chars_edges))
            parts.append(_histogram(i, ACTOR_REJECTED_CHARS, tables.actor_pairs[REJECTED_CHARS].astype("float64"), chars_edges))
    if not parts:
        return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in zip(HISTOGRAM_COLUMNS, ("int64", "str", "float64", "float64", "int64"))})
    return pd.concat(parts, ignore_index=True)
