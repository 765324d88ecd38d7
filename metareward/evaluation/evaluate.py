"""Evaluation: is M_i better than M_{i-1}, and does its judging get better or worse? Plain functions.

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

- win rate: X's wins over the decided comparisons (both orders of every prompt count);
- length-controlled win rate (`length_controlled_win_rate`, in the spirit of AlpacaEval 2 LC): a
  logistic regression of "X won" on the normalised length difference tanh((len X - len Y) / sd),
  sd the standard deviation of the differences; the LC win rate is the fitted probability at zero
  difference, sigmoid(intercept). Fitted by Newton's method (IRLS) with a weak L2 term
  (`LOGISTIC_L2`) that keeps the fit finite when one model wins every comparison;
- confidence intervals: a percentile bootstrap over prompts (both orders of a prompt stay together,
  since they share two texts), `bootstrap_samples` resamples, seeded.

Judge accuracy (`evaluate_judge_accuracy`): the model under test judges each side of a preference set
(prompt, chosen, rejected; `load_preference_set`: the shipped `metareward/data/preference_pairs.jsonl`
or a user's Parquet / JSONL) with the run's rubric (`metareward.prompts.render_judge_prompt`), one
judgment per side, forced verdicts where parsing fails (`forced` mode). Accuracy is the share of
pairs whose chosen side scored higher among the pairs where both sides have a valid score; ties and
pairs without two valid scores are counted separately.

Artifacts go to `{root}/{run}/iter-{i}/evaluation/{name}` (`evaluation_uri`) with manifests
(`metareward.storage.write_artifact`); each carries a fingerprint of its inputs (models, settings,
prompts), and an artifact that storage already holds for the same fingerprint is read back instead of
computed again (unless `refresh`). docs/evaluation.md documents all of this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd

from metareward import contract, parsing, prompt_sources
from metareward.checkpoints import ModelRef
from metareward.config import EvaluationConfig, RunConfig
from metareward.engines.base import Engine, EngineConfig, Sampling
from metareward.hashing import tie_break_key
from metareward.prompts import render_judge_prompt
from metareward.schema import (
    FINISH_REASON,
    N_TOKENS,
    PROMPT,
    PROMPT_ID,
    RESPONSE,
    SCHEMA_VERSION,
    SCORE,
    STATUS,
    STATUS_FORCED,
    STATUS_NO_SCORE,
    STATUS_NO_VERDICT,
    STATUS_OK,
    STATUS_OUT_OF_RANGE,
    VALID_STATUSES,
)
from metareward.stages import force_verdicts
from metareward.storage import ArtifactInfo, Store, is_complete, read_artifact, read_manifest, write_artifact

logger = logging.getLogger(__name__)

EVALUATION_DIR = "evaluation"
# Artifact names under {run}/iter-{i}/evaluation/ (docs/evaluation.md).
RESPONSES = "responses"
COMPARISONS = "comparisons"
WIN_RATE = "win_rate"
PREFERENCE_JUDGMENTS = "preference_judgments"
JUDGE_ACCURACY = "judge_accuracy"

EMBEDDED = "embedded"
EMBEDDED_PREFERENCE_SET = "preference_pairs.jsonl"

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

LOGISTIC_L2 = 1e-2
"""Weight of the L2 term of the LC regression (on intercept and slope): negligible against the
likelihood of a few dozen comparisons, and it keeps the fit finite under complete separation."""

COMPARISONS_COLUMNS = (PROMPT_ID, "order", "judgment", "verdict", STATUS, "winner", "x_chars", "y_chars")
PREFERENCE_COLUMNS = ("pair_id", PROMPT, "chosen", "rejected")
COMPARISON_STATUSES = (STATUS_OK, STATUS_FORCED, STATUS_NO_VERDICT)
JUDGMENT_STATUSES = (STATUS_OK, STATUS_FORCED, STATUS_NO_SCORE, STATUS_OUT_OF_RANGE)

EngineFor = Callable[[EngineConfig, ModelRef], Engine]


class HeldOutOverlapError(ValueError):
    """A held-out prompt was also sampled for training: the evaluation would measure memorisation."""


class PreferenceSetError(ValueError):
    """A preference set that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------
# prompts and verdicts


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


# ----------------------------------------------------------------------------------------------
# held-out prompts


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


# ----------------------------------------------------------------------------------------------
# win rate: responses, comparisons, bookkeeping


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


# ----------------------------------------------------------------------------------------------
# judge accuracy on a preference set


def preference_set_digest(source: str = EMBEDDED, store: Store | None = None) -> str:
    """sha256 of the preference set's bytes: a file edited in place is a new input to the judge accuracy."""
    return hashlib.sha256(_preference_bytes(source, store)[2]).hexdigest()


def _preference_bytes(source: str, store: Store | None) -> tuple[str, str, bytes]:
    """(name in messages, file format, content) of a preference set."""
    if source == EMBEDDED:
        name = f"embedded preference set (metareward/data/{EMBEDDED_PREFERENCE_SET})"
        return name, "jsonl", resources.files("metareward").joinpath("data", EMBEDDED_PREFERENCE_SET).read_bytes()
    name = f"preference set {source}"
    extension = os.path.splitext(source.split("?", 1)[0])[1].lower()
    if extension not in (".parquet", ".pq", ".jsonl", ".ndjson"):
        raise PreferenceSetError(f"{name}: unsupported extension {extension or '(none)'!r}; use .parquet or .jsonl")
    try:
        data = store.read_bytes(source) if store is not None and source.startswith("s3://") else _read_local(source)
    except FileNotFoundError as error:
        raise PreferenceSetError(f"{name} does not exist") from error
    return name, "parquet" if extension in (".parquet", ".pq") else "jsonl", data


def load_preference_set(source: str = EMBEDDED, store: Store | None = None) -> pd.DataFrame:
    """A preference set with columns `pair_id`, `prompt`, `chosen`, `rejected` (plus whatever else the
    file holds, e.g. `category`), in file order.

    `source`: `embedded` (the set shipped in the package, `metareward/data/preference_pairs.jsonl`) or
    a Parquet (`.parquet`, `.pq`) or JSON Lines (`.jsonl`, `.ndjson`) file, local or `s3://`.
    `pair_id` is the file's own column when present (as text), else a hash of the three texts.
    Raises `PreferenceSetError` naming the file for a missing column, empty or non-text values, a
    pair whose chosen and rejected texts are the same, and duplicate pair ids (rows counted from 1).
    """
    name, file_format, data = _preference_bytes(source, store)
    table = prompt_sources.parse_table(data, file_format, name, error=PreferenceSetError)
    return _validated_preferences(table, name)


def _read_local(source: str) -> bytes:
    path = source.split("://", 1)[1] if source.startswith("file://") else source
    if "://" in path:
        raise PreferenceSetError(f"preference set {source}: use a local path or s3://")
    with open(os.path.expanduser(path), "rb") as handle:
        return handle.read()


def _validated_preferences(table: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = [column for column in (PROMPT, "chosen", "rejected") if column not in table.columns]
    if missing:
        raise PreferenceSetError(f"{name}: missing column(s) {', '.join(missing)} (it has {', '.join(map(str, table.columns)) or 'none'})")
    if table.empty:
        raise PreferenceSetError(f"{name} holds no pairs")
    lines = table.attrs.get("lines")
    table = table.reset_index(drop=True)
    for column in (PROMPT, "chosen", "rejected"):
        bad = [row + 1 for row, value in enumerate(table[column]) if not isinstance(value, str) or not value.strip()]
        if bad:
            raise PreferenceSetError(f"{name}: column {column!r} empty or not text at {prompt_sources.describe_rows(bad, lines)}")
    same = [row + 1 for row, (chosen, rejected) in enumerate(zip(table["chosen"], table["rejected"])) if chosen == rejected]
    if same:
        raise PreferenceSetError(
            f"{name}: columns 'chosen' and 'rejected' hold the same text at {prompt_sources.describe_rows(same, lines)}"
        )
    if "pair_id" in table.columns:
        table["pair_id"] = table["pair_id"].astype(str)
    else:
        table["pair_id"] = [
            hashlib.blake2b("\x00".join(texts).encode("utf-8"), digest_size=8).hexdigest()
            for texts in zip(table[PROMPT], table["chosen"], table["rejected"])
        ]
    duplicated = table["pair_id"].duplicated(keep=False)
    if duplicated.any():
        rows = [row + 1 for row in np.flatnonzero(duplicated.to_numpy())]
        raise PreferenceSetError(f"{name}: duplicate pair_id {table.loc[duplicated, 'pair_id'].iloc[0]!r} at rows {', '.join(map(str, rows[:10]))}")
    rest = [column for column in table.columns if column not in PREFERENCE_COLUMNS]
    return table[[*PREFERENCE_COLUMNS, *rest]]


def judge_preference_set(engine: Engine, pairs: pd.DataFrame, settings: EvaluationConfig, seed: int) -> pd.DataFrame:
    """One rubric judgment of each side of each pair: columns `pair_id`, `side` (chosen / rejected),
    `judgment`, `score` (null unless valid), `status` (ok, forced, no_score, out_of_range)."""
    rows, conversations = [], []
    for pair_id, prompt, chosen, rejected in zip(pairs["pair_id"], pairs[PROMPT], pairs["chosen"], pairs["rejected"]):
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            rows.append({"pair_id": pair_id, "side": side})
            conversations.append(_user(render_judge_prompt(prompt, response)))
    table = pd.DataFrame(rows, columns=["pair_id", "side"])
    sampling = Sampling(
        temperature=settings.judge_temperature, top_p=1.0, max_tokens=settings.judge_max_tokens, seed=_seed(seed, "accuracy")
    )
    texts = [samples[0].text for samples in engine.generate(conversations, sampling, n=1)] if conversations else []
    table["judgment"] = texts
    parsed = parsing.parse_scores(table["judgment"]) if len(table) else pd.DataFrame({SCORE: [], STATUS: []})
    table[SCORE] = parsed[SCORE].to_numpy(dtype=np.float64)
    table[STATUS] = parsed[STATUS].astype(str).to_numpy(dtype=object)
    if settings.verdict_mode == "forced":
        failed = np.flatnonzero((table[STATUS] != STATUS_OK).to_numpy())
        if len(failed):
            options, completed = force_verdicts(
                engine,
                [conversations[row] for row in failed],
                table["judgment"].to_numpy()[failed].tolist(),
                "score",
                settings.judge_temperature,
                _seed(seed, "accuracy/forced"),
            )
            table.loc[failed, "judgment"] = completed
            table.loc[failed, SCORE] = [float(option) for option in options]
            table.loc[failed, STATUS] = STATUS_FORCED
    return table


def judge_accuracy(judgments: pd.DataFrame) -> dict[str, Any]:
    """Accuracy from `judge_preference_set`'s table: among pairs whose two sides both have a valid
    score, the share where chosen scored higher (`accuracy`), lower (`wrong_share`) or the same
    (`tie_share`); pairs without two valid scores are counted as `unscored`, judgments by status."""
    valid = judgments[judgments[STATUS].isin(VALID_STATUSES)]
    sides = valid.pivot(index="pair_id", columns="side", values=SCORE).reindex(columns=["chosen", "rejected"])
    sides = sides.dropna()
    pairs = int(judgments["pair_id"].nunique())
    scored = len(sides)
    correct = int((sides["chosen"] > sides["rejected"]).sum())
    wrong = int((sides["chosen"] < sides["rejected"]).sum())
    ties = scored - correct - wrong
    counted = judgments[STATUS].value_counts()
    return {
        "pairs": pairs,
        "scored_pairs": scored,
        "unscored_pairs": pairs - scored,
        "correct": correct,
        "wrong": wrong,
        "ties": ties,
        "accuracy": correct / scored if scored else None,
        "wrong_share": wrong / scored if scored else None,
        "tie_share": ties / scored if scored else None,
        "statuses": {status: int(counted.get(status, 0)) for status in JUDGMENT_STATUSES},
        "mean_chosen_score": float(sides["chosen"].mean()) if scored else None,
        "mean_rejected_score": float(sides["rejected"].mean()) if scored else None,
    }


# ----------------------------------------------------------------------------------------------
# artifacts


def evaluation_uri(store: Store, run: str, iteration: int, name: str) -> str:
    """`{root}/{run}/iter-{i}/evaluation/{name}`: where an evaluation artifact of iteration i lives."""
    return store.join(store.iteration_uri(run, iteration), EVALUATION_DIR, name)


def _info(
    store: Store,
    stage: contract.Stage,
    config: RunConfig,
    model: ModelRef | None,
    upstream: dict[str, str],
) -> ArtifactInfo:
    """What an evaluation artifact records: the fingerprint of its declared stage
    (`metareward.contract.EVALUATION_STAGES`) over its settings, the model that wrote it, the
    upstream artifacts' fingerprints (read from their manifests) and the input files' digests."""
    settings = contract.settings_of(stage.settings, config)
    digests = {}
    if stage.reads_prompt_pool:
        digests["prompt_pool"] = prompt_sources.source_digest(config.prompts.source, store=store)
    if stage.reads_preference_set:
        digests["preference_set"] = preference_set_digest(config.evaluation.preference_set, store=store)
    keys = {role: str(read_manifest(store, uri)["fingerprint"]) for role, uri in upstream.items()}
    sha256 = model.sha256 if model is not None else None
    return ArtifactInfo(
        stage=stage.name,
        schema_version=SCHEMA_VERSION,
        pipeline_version=contract.PIPELINE_VERSION,
        fingerprint=contract.fingerprint(stage, settings, sha256, keys, digests),
        checkpoint_sha256=sha256 if stage.uses_checkpoint else None,
        config=settings.model_dump(mode="json"),
        upstream=upstream,
    )


def _stored_or_computed(
    store: Store, uri: str, info: ArtifactInfo, compute: Callable[[], pd.DataFrame], refresh: bool
) -> pd.DataFrame:
    """The artifact at `uri` when storage holds it complete under the same fingerprint, else `compute()` written there."""
    if not refresh and is_complete(store, uri) and read_manifest(store, uri).get("fingerprint") == info.fingerprint:
        logger.info("%s: reused (same inputs)", uri)
        return read_artifact(store, uri)
    table = compute()
    write_artifact(store, uri, table, info)
    return table


class EngineSlot:
    """Holds one loaded model at a time: asking for another model releases the loaded ones first, so a
    GPU never holds the models under test and the judge together."""

    def __init__(self, store: Store, load: EngineFor | None = None):
        self._store, self._load = store, load
        self._loaded: tuple[str, str] | None = None

    def __call__(self, config: EngineConfig, model: ModelRef) -> Engine:
        from metareward.engines import load_engine, release_engines

        wanted = (model.sha256, config.model_dump_json())
        if self._loaded is not None and self._loaded != wanted:
            release_engines()
        self._loaded = wanted
        if self._load is not None:
            return self._load(config, model)
        return load_engine(config, model, fs=None if self._store.protocol == "file" else self._store.fs)

    def release(self) -> None:
        from metareward.engines import release_engines

        if self._loaded is not None:
            release_engines()
            self._loaded = None


def evaluate_win_rate(
    store: Store,
    config: RunConfig,
    iteration: int,
    model_x: ModelRef,
    model_y: ModelRef,
    judge: ModelRef,
    engines: EngineSlot,
    refresh: bool = False,
) -> dict[str, Any]:
    """X against Y on the held-out prompts, judged by `judge` (engine `evaluation.judge_engine`, else the
    run's): writes `responses`, `comparisons` and `win_rate` under iteration `iteration`'s evaluation
    folder and returns the summary (`win_rate_summary` plus the models and URIs)."""
    settings = config.evaluation
    seed = config.seed if settings.seed is None else settings.seed
    prompts = heldout_eval_prompts(store, config)
    responses, responses_uris = {}, {}
    for role, model in ((MODEL_X, model_x), (MODEL_Y, model_y)):

        def compute(model: ModelRef = model) -> pd.DataFrame:
            return generate_responses(engines(config.engine, model), prompts, settings, _seed(seed, "responses"))

        responses_uris[role] = evaluation_uri(store, config.name, iteration, f"{RESPONSES}_{role}")
        info = _info(store, contract.EVAL_RESPONSES, config, model, {})
        responses[role] = _stored_or_computed(store, responses_uris[role], info, compute, refresh)
    judge_engine = settings.judge_engine or config.engine
    comparisons_uri = evaluation_uri(store, config.name, iteration, COMPARISONS)
    upstream = {f"{RESPONSES}_{role}": uri for role, uri in responses_uris.items()}
    comparisons = _stored_or_computed(
        store,
        comparisons_uri,
        _info(store, contract.EVAL_COMPARISONS, config, judge, upstream),
        lambda: compare_responses(engines(judge_engine, judge), prompts, responses[MODEL_X], responses[MODEL_Y], settings, seed),
        refresh,
    )
    summary = win_rate_summary(comparisons, settings.bootstrap_samples, settings.confidence, seed)
    summary.update(
        {
            "iteration": iteration,
            "model_x": model_x.uri,
            "model_x_sha256": model_x.sha256,
            "model_y": model_y.uri,
            "model_y_sha256": model_y.sha256,
            "judge": judge.uri,
            "judge_sha256": judge.sha256,
            "judge_backend": judge_engine.backend,
        }
    )
    row = {name: (json.dumps(value, sort_keys=True) if isinstance(value, dict) else value) for name, value in summary.items()}
    uri = evaluation_uri(store, config.name, iteration, WIN_RATE)
    write_artifact(store, uri, pd.DataFrame([row]), _info(store, contract.EVAL_WIN_RATE, config, None, {COMPARISONS: comparisons_uri}))
    summary["uris"] = {**{f"{RESPONSES}_{role}": u for role, u in responses_uris.items()}, COMPARISONS: comparisons_uri, WIN_RATE: uri}
    return summary


def evaluate_judge_accuracy(
    store: Store,
    config: RunConfig,
    iteration: int,
    models: dict[str, ModelRef],
    engines: EngineSlot,
    refresh: bool = False,
) -> list[dict[str, Any]]:
    """Each model of `models` (role -> checkpoint, e.g. {"x": M_i, "y": M_{i-1}}) judges the preference set
    `evaluation.preference_set` (first `max_pairs` pairs; 0 = all) with the run's engine: writes
    `preference_judgments_{role}` and one `judge_accuracy` table (a row per model) and returns the rows."""
    settings = config.evaluation
    seed = config.seed if settings.seed is None else settings.seed
    pairs = load_preference_set(settings.preference_set, store=store)
    if settings.max_pairs:
        pairs = pairs.head(settings.max_pairs).reset_index(drop=True)
    rows, judgments_uris = [], {}
    for role, model in models.items():
        uri = evaluation_uri(store, config.name, iteration, f"{PREFERENCE_JUDGMENTS}_{role}")

        def compute(model: ModelRef = model) -> pd.DataFrame:
            return judge_preference_set(engines(config.engine, model), pairs, settings, seed)

        info = _info(store, contract.EVAL_PREFERENCE_JUDGMENTS, config, model, {})
        judgments = _stored_or_computed(store, uri, info, compute, refresh)
        judgments_uris[role] = uri
        rows.append(
            {
                "iteration": iteration,
                "role": role,
                "model": model.uri,
                "model_sha256": model.sha256,
                "preference_set": settings.preference_set,
                **judge_accuracy(judgments),
            }
        )
    table = pd.DataFrame([{k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v) for k, v in row.items()} for row in rows])
    uri = evaluation_uri(store, config.name, iteration, JUDGE_ACCURACY)
    upstream = {f"judgments_{role}": uri for role, uri in judgments_uris.items()}
    info = _info(store, contract.EVAL_JUDGE_ACCURACY, config, None, upstream)
    write_artifact(store, uri, table.astype({"accuracy": "float64", "wrong_share": "float64", "tie_share": "float64"}), info)
    for row in rows:
        row["uri"] = uri
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def evaluation_markdown(run: str, iteration: int, win_rate: dict[str, Any] | None, accuracy: Sequence[dict[str, Any]]) -> str:
    """The evaluation of one iteration as markdown: win rate and LC win rate with their intervals,
    verdict counts, then the judge accuracy of each model."""
    lines = [f"# Evaluation of {run}, iteration {iteration}", ""]
    if win_rate is not None:
        level = f"{100 * win_rate['confidence']:.0f}%"
        lines += [
            "## Win rate of X against Y on the held-out prompts",
            "",
            f"X: `{win_rate['model_x']}` (sha256 `{win_rate['model_x_sha256'][:12]}`), "
            f"Y: `{win_rate['model_y']}` (sha256 `{win_rate['model_y_sha256'][:12]}`), "
            f"judge: `{win_rate['judge']}` ({win_rate['judge_backend']}, sha256 `{win_rate['judge_sha256'][:12]}`)",
            "",
            f"| what | estimate | {level} interval (bootstrap over prompts) |",
            "|---|---|---|",
            f"| win rate | {_percent(win_rate['win_rate'])} | {_percent(win_rate['win_rate_low'])} - {_percent(win_rate['win_rate_high'])} |",
            f"| length-controlled win rate | {_percent(win_rate['lc_win_rate'])} | {_percent(win_rate['lc_low'])} - {_percent(win_rate['lc_high'])} |",
            "",
            "| count | value |",
            "|---|---|",
            f"| prompts | {win_rate['prompts']} |",
            f"| comparisons (both orders) | {win_rate['comparisons']} |",
            f"| decided | {win_rate['decided']} |",
            *[f"| verdicts {status} | {count} |" for status, count in win_rate["statuses"].items()],
            f"| X wins / Y wins | {win_rate['x_wins']} / {win_rate['y_wins']} |",
            f"| prompts X won in both orders / split / Y won in both | {win_rate['prompts_x_won_both']} / {win_rate['prompts_split']} / {win_rate['prompts_y_won_both']} |",
            f"| verdicts for Response A (position bias) | {_percent(win_rate['verdicts_for_a'])} |",
            f"| mean length X / Y (characters) | {win_rate['mean_x_chars']:.0f} / {win_rate['mean_y_chars']:.0f} |",
            "",
        ]
    if accuracy:
        lines += [
            "## Judge accuracy on the preference set",
            "",
            "| model | role | pairs | scored | accuracy | wrong | ties | forced judgments |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in accuracy:
            lines.append(
                f"| `{row['model']}` | {row['role']} | {row['pairs']} | {row['scored_pairs']} | {_percent(row['accuracy'])} | "
                f"{_percent(row['wrong_share'])} | {_percent(row['tie_share'])} | {row['statuses'].get(STATUS_FORCED, 0)} |"
            )
        lines.append("")
    return "\n".join(lines)
