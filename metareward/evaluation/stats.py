"""The statistics of the win rate, from the decided comparisons:

- win rate: X's wins over the decided comparisons (both orders of every prompt count);
- length-controlled win rate (`length_controlled_win_rate`, in the spirit of AlpacaEval 2 LC): a
  logistic regression of "X won" on the normalised length difference tanh((len X - len Y) / sd),
  sd the standard deviation of the differences; the LC win rate is the fitted probability at zero
  difference, sigmoid(intercept). Fitted by Newton's method (IRLS) with a weak L2 term
  (`LOGISTIC_L2`) that keeps the fit finite when one model wins every comparison;
- confidence intervals: a percentile bootstrap over prompts (both orders of a prompt stay together,
  since they share two texts), `bootstrap_samples` resamples, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from metareward.evaluation.comparisons import COMPARISON_STATUSES, MODEL_X, MODEL_Y
from metareward.schema import PROMPT_ID, STATUS


LOGISTIC_L2 = 1e-2
"""Weight of the L2 term of the LC regression (on intercept and slope): negligible against the
likelihood of a few dozen comparisons, and it keeps the fit finite under complete separation."""


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * values))


def fit_logistic(features: np.ndarray, outcomes: np.ndarray, l2: float = LOGISTIC_L2, max_steps: int = 100) -> np.ndarray:
    """Coefficients of a logistic regression of `outcomes` (0/1, or shares in [0, 1]) on `features`
    (an intercept column is added first): Newton's method (IRLS) on the log-likelihood minus
    `l2`/2 times the squared coefficients. Returns [intercept, slopes...]."""
    design = np.column_stack([np.ones(len(outcomes)), np.asarray(features, dtype=np.float64).reshape(len(outcomes), -1)])
    outcomes = np.asarray(outcomes, dtype=np.float64)
    coefficients = np.zeros(design.shape[1])
    penalty = l2 * np.eye(design.shape[1])
    for _ in range(max_steps):
        p = _sigmoid(design @ coefficients)
        gradient = design.T @ (outcomes - p) - l2 * coefficients
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + penalty
        step = np.linalg.solve(hessian, gradient)
        coefficients = coefficients + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return coefficients


@dataclass(frozen=True)
class WinRateEstimate:
    """The win rate and the length-controlled win rate of X against Y, each with its bootstrap interval.

    comparisons: decided comparisons used; prompts: prompts with at least one of them.
    length_slope: the regression's coefficient of tanh(length difference / length_scale);
    length_scale: the standard deviation of the length differences (characters).
    """

    comparisons: int
    prompts: int
    win_rate: float
    win_rate_low: float
    win_rate_high: float
    lc_win_rate: float
    lc_low: float
    lc_high: float
    length_slope: float
    length_scale: float
    mean_length_difference: float


def length_controlled_win_rate(
    prompt_ids: Sequence[str],
    x_won: Sequence[float],
    length_difference: Sequence[float],
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRateEstimate | None:
    """Win rate and LC win rate from decided comparisons (one entry each: the prompt, whether X won,
    len(X) - len(Y)), with percentile bootstrap intervals over prompts. None when there is none."""
    ids = np.asarray(prompt_ids, dtype=object)
    outcomes = np.asarray(x_won, dtype=np.float64)
    difference = np.asarray(length_difference, dtype=np.float64)
    if not len(ids) == len(outcomes) == len(difference):
        raise ValueError("prompt_ids, x_won and length_difference must have the same length")
    if len(outcomes) == 0:
        return None
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be >= 1, got {bootstrap_samples}")
    scale = float(difference.std())
    scale = scale if scale > 0 else 1.0
    feature = np.tanh(difference / scale)

    def estimates(rows: np.ndarray) -> tuple[float, float, float]:
        intercept, slope = fit_logistic(feature[rows], outcomes[rows])
        return float(outcomes[rows].mean()), float(_sigmoid(np.array(intercept))), float(slope)

    win_rate, lc_win_rate, slope = estimates(np.arange(len(outcomes)))
    # Cluster bootstrap: resample prompts, each with all its comparisons (its two orders share texts).
    unique, groups = np.unique(ids.astype(str), return_inverse=True)
    members = [np.flatnonzero(groups == group) for group in range(len(unique))]
    rng = np.random.default_rng([seed, len(outcomes)])
    draws = np.empty((bootstrap_samples, 2))
    for sample in range(bootstrap_samples):
        rows = np.concatenate([members[group] for group in rng.integers(0, len(unique), len(unique))])
        draws[sample, :] = estimates(rows)[:2]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return WinRateEstimate(
        comparisons=len(outcomes),
        prompts=len(unique),
        win_rate=win_rate,
        win_rate_low=float(low[0]),
        win_rate_high=float(high[0]),
        lc_win_rate=lc_win_rate,
        lc_low=float(low[1]),
        lc_high=float(high[1]),
        length_slope=slope,
        length_scale=scale,
        mean_length_difference=float(difference.mean()),
    )


def win_rate_summary(comparisons: pd.DataFrame, bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Counts and estimates from a comparisons table: comparisons by status, verdicts for Response A
    (position bias), prompts X won in both orders / split / lost in both, and `WinRateEstimate`'s
    fields (None when no comparison was decided)."""
    decided = comparisons[comparisons["winner"].notna()]
    per_prompt = decided.groupby(PROMPT_ID)["winner"].agg(lambda winners: (winners == MODEL_X).mean())
    both_orders = decided.groupby(PROMPT_ID).size() == 2
    estimate = length_controlled_win_rate(
        decided[PROMPT_ID].astype(str).tolist(),
        (decided["winner"] == MODEL_X).astype(float).tolist(),
        (decided["x_chars"] - decided["y_chars"]).astype(float).tolist(),
        bootstrap_samples=bootstrap_samples,
        confidence=confidence,
        seed=seed,
    )
    counted = comparisons[STATUS].value_counts()
    summary: dict[str, Any] = {
        "prompts": int(comparisons[PROMPT_ID].nunique()),
        "comparisons": len(comparisons),
        "decided": len(decided),
        "statuses": {status: int(counted.get(status, 0)) for status in COMPARISON_STATUSES},
        "x_wins": int((decided["winner"] == MODEL_X).sum()),
        "y_wins": int((decided["winner"] == MODEL_Y).sum()),
        "prompts_x_won_both": int(((per_prompt == 1.0) & both_orders.reindex(per_prompt.index)).sum()),
        "prompts_split": int(((per_prompt == 0.5) & both_orders.reindex(per_prompt.index)).sum()),
        "prompts_y_won_both": int(((per_prompt == 0.0) & both_orders.reindex(per_prompt.index)).sum()),
        "verdicts_for_a": float((decided["verdict"] == "A").mean()) if len(decided) else None,
        "mean_x_chars": float(comparisons["x_chars"].mean()) if len(comparisons) else None,
        "mean_y_chars": float(comparisons["y_chars"].mean()) if len(comparisons) else None,
        "confidence": confidence,
        "bootstrap_samples": bootstrap_samples,
    }
    fields = WinRateEstimate.__dataclass_fields__
    summary.update({name: (getattr(estimate, name) if estimate else None) for name in fields if name not in ("comparisons", "prompts")})
    return summary
