"""The meta-judge side of an iteration: which response to meta-judge, which comparisons to ask,
position-bias weights, Elo of the judgments, and the judge preference pairs (docs/method.md).

1. `select_meta_targets`: per prompt, the response whose valid judgment scores have the highest
   population variance (needs >= 2 valid judgments and variance > 0; ties to the smaller
   `tie_break_key(seed, response_id)`).
2. `plan_comparisons`: every ordered pair of the target's valid judgments: N(N-1) per prompt.
3. `positional_weights`: w1 = win_2nd / (win_1st + win_2nd), w2 = win_1st / (win_1st + win_2nd)
   over every decided verdict of the iteration; (0.5, 0.5) when none is decided.
4. `judgment_elo`: battle matrix B[m][n] = w1 * [m won as Judgment A against n] + w2 * [m won as
   Judgment B against n]; Elo from the Bradley-Terry fit that maximises
   sum_{m != n} B[m][n] * log sigmoid(e_m - e_n) - (l2 / 2) * sum_m e_m^2, all targets at once.
   Elo = ELO_BASE + ELO_SCALE * e (ELO_SCALE = 400 / ln 10, so an Elo gap of 400 means 10:1 odds).
   The L2 term keeps e finite when a judgment wins everything and centres each target's e at 0,
   so each target's Elo averages ELO_BASE.
5. `select_judge_pairs`: chosen = highest Elo, rejected = lowest, with the spec's filters.

Selections return DataFrames and count the prompts they drop, per reason, in `attrs["dropped"]`.
Everything works on whole tables and padded (targets x N x N) arrays, never a loop per prompt.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from metareward.hashing import tie_break_keys
from metareward.pairs import first_per_group
from metareward.prompts import render_judge_prompt
from metareward.schema import (
    CHOSEN,
    CHOSEN_CHARS,
    CHOSEN_ELO,
    CHOSEN_ID,
    CHOSEN_SCORE,
    COMPARISONS_COLUMNS,
    ELO,
    ELO_COLUMNS,
    JUDGMENT,
    JUDGMENT_A_ID,
    JUDGMENT_B_ID,
    JUDGMENT_ID,
    KIND,
    KIND_JUDGE,
    N_VALID,
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
    SCORE_VAR,
    STATUS,
    VALID_STATUSES,
    WINNER,
    SchemaError,
    show,
    check_judgments,
    check_meta_judgments,
    require_columns,
    require_no_nulls,
    require_unique,
)
from metareward.scoring import response_scores

ELO_BASE = 1000.0
ELO_SCALE = 400.0 / math.log(10.0)
DEFAULT_L2 = 0.01
"""L2 strength, in units of battle weight (one verdict weighs w1 or w2, about 0.5). Small next to
the ~10 units of weight each judgment carries with N = 11: on random 11-judgment tournaments it
shrinks Elo by a median 1.5 points (versus l2 = 1e-4) and never changed which judgment is highest
or lowest; large enough to keep a judgment that wins everything finite (~1,000 Elo above the rest)."""
ELO_TIE_TOLERANCE = 1e-6
"""Elo points. Judgments within this of the highest (lowest) Elo tie for chosen (rejected), and a
target whose highest and lowest Elo are this close gives no pair. Far above the solver's error
(~1e-8 Elo), far below any difference a verdict makes."""

META_TARGET_DROP_REASONS = ("fewer_than_2_valid_judgments", "no_score_variance")
JUDGE_DROP_REASONS = ("no_decided_comparison", "elo_all_equal", "same_text", "chosen_judgment_too_long", "same_score")


def select_meta_targets(judgments: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per prompt of `judgments` (prompt_id, response_id, judgment_id, score, status), the response
    to meta-judge, as rows of the score table (prompt_id, response_id, score_mean, score_var,
    n_valid), sorted by prompt_id. `attrs["dropped"]` counts the prompts without one:
    fewer_than_2_valid_judgments (no response has 2 valid judgments), no_score_variance (those
    that do all have variance 0)."""
    scores = response_scores(judgments)
    prompt_codes, prompt_ids = pd.factorize(scores[PROMPT_ID], sort=True)
    n_prompts = len(prompt_ids)
    has_two = scores[N_VALID].to_numpy() >= 2
    variance = scores[SCORE_VAR].to_numpy()
    eligible = np.flatnonzero(has_two & (variance > 0))
    # Only responses tied at their prompt's highest variance can need a tie-break key.
    highest = np.full(n_prompts, -np.inf)
    np.maximum.at(highest, prompt_codes[eligible], variance[eligible])
    eligible = eligible[variance[eligible] == highest[prompt_codes[eligible]]]
    keys = tie_break_keys(seed, scores[RESPONSE_ID].to_numpy()[eligible])
    best = first_per_group(prompt_codes[eligible], (keys,), eligible, n_prompts)

    any_two = np.bincount(prompt_codes[has_two], minlength=n_prompts) > 0
    chosen = best >= 0
    dropped = {
        "fewer_than_2_valid_judgments": int((~any_two).sum()),
        "no_score_variance": int((any_two & ~chosen).sum()),
    }
    targets = scores.iloc[best[chosen]].reset_index(drop=True)
    targets.attrs["dropped"] = dropped
    return targets


def plan_comparisons(judgments: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Every ordered pair of the targets' valid judgments (both orders, never a judgment with
    itself): prompt_id, response_id, judgment_a_id, judgment_b_id, sorted in that order. A target
    with N valid judgments gets N(N-1) rows."""
    check_judgments(judgments)
    _check_targets(targets)
    target_of_row = pd.Index(targets[RESPONSE_ID]).get_indexer(judgments[RESPONSE_ID])
    keep = judgments[STATUS].isin(VALID_STATUSES).to_numpy() & (target_of_row >= 0)
    valid = judgments.loc[keep, [PROMPT_ID, RESPONSE_ID, JUDGMENT_ID]]
    target_prompt = targets[PROMPT_ID].to_numpy()[target_of_row[keep]]
    mismatch = valid[PROMPT_ID].to_numpy() != target_prompt
    if mismatch.any():
        row = valid.iloc[int(mismatch.argmax())]
        raise SchemaError(
            f"targets: response_id {show(row[RESPONSE_ID])} is listed under prompt_id "
            f"{show(target_prompt[int(mismatch.argmax())])} but its judgments are under {show(row[PROMPT_ID])}"
        )
    valid = valid.sort_values([PROMPT_ID, RESPONSE_ID, JUDGMENT_ID], ignore_index=True)

    _, sizes = np.unique(pd.factorize(valid[RESPONSE_ID])[0], return_counts=True)
    starts = np.cumsum(sizes) - sizes
    squares = sizes * sizes
    group = np.repeat(np.arange(len(sizes)), squares)
    within = np.arange(squares.sum()) - np.repeat(np.cumsum(squares) - squares, squares)
    size = sizes[group]
    a_local, b_local = within // size, within % size
    keep = a_local != b_local
    a_rows = starts[group[keep]] + a_local[keep]
    b_rows = starts[group[keep]] + b_local[keep]

    # Series.take keeps the columns' own (Arrow) storage: no round trip through Python strings.
    return pd.DataFrame(
        {
            PROMPT_ID: valid[PROMPT_ID].take(a_rows).array,
            RESPONSE_ID: valid[RESPONSE_ID].take(a_rows).array,
            JUDGMENT_A_ID: valid[JUDGMENT_ID].take(a_rows).array,
            JUDGMENT_B_ID: valid[JUDGMENT_ID].take(b_rows).array,
        },
        columns=list(COMPARISONS_COLUMNS),
    )


def positional_weights(meta_judgments: pd.DataFrame) -> tuple[float, float]:
    """(w1, w2) over all decided verdicts of the iteration: w1 weighs a win as Judgment A, w2 a win
    as Judgment B; a win from the favoured slot counts less. (0.5, 0.5) when nothing is decided."""
    check_meta_judgments(meta_judgments)
    winners = meta_judgments[WINNER]
    win_1st = int((winners == "A").sum())
    win_2nd = int((winners == "B").sum())
    if win_1st + win_2nd == 0:
        return 0.5, 0.5
    return win_2nd / (win_1st + win_2nd), win_1st / (win_1st + win_2nd)


def judgment_elo(
    meta_judgments: pd.DataFrame,
    w1: float,
    w2: float,
    *,
    l2: float = DEFAULT_L2,
    max_iterations: int = 100,
    tolerance: float = 1e-10,
) -> pd.DataFrame:
    """Elo of every judgment that took part in at least one decided comparison (winner A or B),
    from one batched Bradley-Terry fit over all targets: rows prompt_id, response_id,
    judgment_id, elo, sorted in that order. A judgment without a decided comparison gets no row.

    meta_judgments: prompt_id, response_id, judgment_a_id, judgment_b_id, winner, status.
    w1, w2: from `positional_weights` (any non-negative finite numbers are accepted).
    l2: strength of the L2 term (> 0). max_iterations, tolerance: Newton's method stops when no
    strength moves by more than `tolerance` (natural units); raises if that takes longer.
    """
    check_meta_judgments(meta_judgments)
    for name, value in (("w1", w1), ("w2", w2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SchemaError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 <= 0:
        raise SchemaError(f"l2 must be a finite number > 0, got {l2!r}")

    decided = meta_judgments.loc[
        meta_judgments[WINNER].notna().to_numpy(), [PROMPT_ID, RESPONSE_ID, JUDGMENT_A_ID, JUDGMENT_B_ID, WINNER]
    ]
    if decided.empty:
        return pd.DataFrame({column: pd.Series(dtype="float64" if column == ELO else "str") for column in ELO_COLUMNS})
    first_won = (decided[WINNER] == "A").to_numpy()
    target_codes, target_ids = pd.factorize(decided[RESPONSE_ID], sort=True)
    judgment_codes, judgment_ids = pd.factorize(
        pd.concat([decided[JUDGMENT_A_ID], decided[JUDGMENT_B_ID]], ignore_index=True), sort=True
    )
    n_judgments = len(judgment_ids)
    a_keys = target_codes.astype(np.int64) * n_judgments + judgment_codes[: len(decided)]
    b_keys = target_codes.astype(np.int64) * n_judgments + judgment_codes[len(decided) :]

    # Participants: unique (target, judgment), sorted by target then judgment id; local index in target.
    participants = np.unique(np.concatenate([a_keys, b_keys]))
    participant_target = participants // n_judgments
    target_start = np.searchsorted(participant_target, np.arange(len(target_ids)))
    local = np.arange(len(participants)) - target_start[participant_target]
    size = int(local.max()) + 1

    winner_keys = np.where(first_won, a_keys, b_keys)
    loser_keys = np.where(first_won, b_keys, a_keys)
    winner_local = local[np.searchsorted(participants, winner_keys)]
    loser_local = local[np.searchsorted(participants, loser_keys)]
    weights = np.where(first_won, float(w1), float(w2))
    flat = (target_codes.astype(np.int64) * size + winner_local) * size + loser_local
    battles = np.bincount(flat, weights=weights, minlength=len(target_ids) * size * size).reshape(len(target_ids), size, size)

    strengths = _bradley_terry(battles, l2, max_iterations, tolerance, target_ids)
    prompt_of_target = decided.drop_duplicates(RESPONSE_ID).set_index(RESPONSE_ID)[PROMPT_ID].reindex(target_ids)
    elo = pd.DataFrame(
        {
            PROMPT_ID: prompt_of_target.to_numpy()[participant_target],
            RESPONSE_ID: np.asarray(target_ids)[participant_target],
            JUDGMENT_ID: np.asarray(judgment_ids)[participants % n_judgments],
            ELO: ELO_BASE + ELO_SCALE * strengths[participant_target, local],
        },
        columns=list(ELO_COLUMNS),
    )
    return elo.sort_values([PROMPT_ID, RESPONSE_ID, JUDGMENT_ID], ignore_index=True)


def select_judge_pairs(
    elo: pd.DataFrame,
    *,
    targets: pd.DataFrame,
    judgments: pd.DataFrame,
    responses: pd.DataFrame,
    prompts: pd.DataFrame,
    max_chosen_chars: int | None = None,
    require_distinct_scores: bool = False,
    elo_tolerance: float = ELO_TIE_TOLERANCE,
    seed: int = 0,
) -> pd.DataFrame:
    """The judge pairs: at most one row per target, columns PAIRS_COLUMNS (kind 'judge'), sorted by
    prompt_id. chosen = the highest-Elo judgment, rejected = the lowest; judgments within
    `elo_tolerance` of the extreme tie, and ties go to the smaller `tie_break_key(seed, judgment_id)`.
    The row's prompt is the judge prompt filled with the user prompt and the target response;
    chosen/rejected are the judgments' texts, chosen_score/rejected_score their own scores.

    elo: `judgment_elo` output. targets: `select_meta_targets` output (prompt_id, response_id).
    judgments: judgment_id, judgment, score. responses: response_id, response. prompts:
    prompt_id, prompt. max_chosen_chars: drop the pair when the chosen judgment is longer (in
    characters); None: no cap. require_distinct_scores: drop the pair when both judgments gave the
    same score (a peer implementation's filter, not the paper's).

    `attrs["dropped"]` counts, per reason of JUDGE_DROP_REASONS in that order of checking:
    no_decided_comparison (the target has no Elo), elo_all_equal, same_text,
    chosen_judgment_too_long, same_score; selected + dropped = len(targets).
    """
    _check_targets(targets)
    require_columns(elo, ELO_COLUMNS, "elo")
    require_no_nulls(elo, ELO_COLUMNS, "elo")
    require_unique(elo, JUDGMENT_ID, "elo")
    require_columns(judgments, (JUDGMENT_ID, JUDGMENT, SCORE), "judgments")
    judgment_index = pd.Index(judgments[JUDGMENT_ID])
    if not judgment_index.is_unique:  # its hash table then serves the lookups below
        require_unique(judgments, JUDGMENT_ID, "judgments")
    require_columns(responses, (RESPONSE_ID, RESPONSE), "responses")
    require_unique(responses, RESPONSE_ID, "responses")
    require_columns(prompts, (PROMPT_ID, PROMPT), "prompts")
    require_unique(prompts, PROMPT_ID, "prompts")
    if max_chosen_chars is not None and (isinstance(max_chosen_chars, bool) or not isinstance(max_chosen_chars, (int, np.integer)) or max_chosen_chars < 0):
        raise SchemaError(f"max_chosen_chars must be a non-negative int or None, got {max_chosen_chars!r}")
    if isinstance(elo_tolerance, bool) or not isinstance(elo_tolerance, (int, float)) or not elo_tolerance >= 0:
        raise SchemaError(f"elo_tolerance must be a number >= 0, got {elo_tolerance!r}")

    targets = targets.sort_values(PROMPT_ID, ignore_index=True)
    n_targets = len(targets)
    target_codes = pd.Index(targets[RESPONSE_ID]).get_indexer(elo[RESPONSE_ID])
    if (target_codes < 0).any():
        raise SchemaError(f"elo: response_id {show(elo[RESPONSE_ID].to_numpy()[target_codes < 0][0])} is not a meta-judge target")
    values = elo[ELO].to_numpy(dtype=np.float64)
    rows = np.arange(len(elo))
    top = np.full(n_targets, -np.inf)
    bottom = np.full(n_targets, np.inf)
    np.maximum.at(top, target_codes, values)
    np.minimum.at(bottom, target_codes, values)
    near_top = values >= top[target_codes] - elo_tolerance
    keys = np.zeros(len(elo), dtype=np.uint64)  # hashed only near the top or bottom, where ties are broken
    near_an_end = near_top | (values <= bottom[target_codes] + elo_tolerance)
    keys[near_an_end] = tie_break_keys(seed, elo[JUDGMENT_ID].to_numpy()[near_an_end])
    chosen_row = first_per_group(target_codes[near_top], (keys[near_top],), rows[near_top], n_targets)
    # The chosen judgment is never also the rejected one (possible when top - bottom <= 2 * tolerance).
    near_bottom = (values <= bottom[target_codes] + elo_tolerance) & (rows != chosen_row[target_codes])
    rejected_row = first_per_group(target_codes[near_bottom], (keys[near_bottom],), rows[near_bottom], n_targets)

    remaining = np.ones(n_targets, dtype=bool)
    dropped: dict[str, int] = {}

    def drop(reason: str, fails: np.ndarray) -> None:
        fails = fails & remaining
        dropped[reason] = int(fails.sum())
        remaining[fails] = False

    drop("no_decided_comparison", chosen_row < 0)
    drop("elo_all_equal", top - bottom <= elo_tolerance)
    live = np.flatnonzero(remaining)
    elo_ids = elo[JUDGMENT_ID].to_numpy()
    live_ids = elo_ids[np.r_[chosen_row[live], rejected_row[live]]]
    position = judgment_index.get_indexer(live_ids)
    if (position < 0).any():
        raise SchemaError(f"judgments: no row for judgment_id {show(live_ids[position < 0][0])} of the elo table")
    chosen_position, rejected_position = position[: len(live)], position[len(live) :]
    chosen_text = np.empty(n_targets, dtype=object)
    rejected_text = np.empty(n_targets, dtype=object)
    chosen_score = np.full(n_targets, np.nan)
    rejected_score = np.full(n_targets, np.nan)
    chosen_text[live] = judgments[JUDGMENT].iloc[chosen_position].to_numpy(dtype=object)
    rejected_text[live] = judgments[JUDGMENT].iloc[rejected_position].to_numpy(dtype=object)
    chosen_score[live] = judgments[SCORE].iloc[chosen_position].to_numpy(dtype=np.float64)
    rejected_score[live] = judgments[SCORE].iloc[rejected_position].to_numpy(dtype=np.float64)
    unreadable = pd.isna(chosen_text[live]) | pd.isna(rejected_text[live])
    if unreadable.any():
        raise SchemaError(f"judgments: judgment_id {show(elo_ids[chosen_row[live]][unreadable][0])} or its pair has no 'judgment' text")
    chosen_chars = np.zeros(n_targets, dtype=np.int64)
    rejected_chars = np.zeros(n_targets, dtype=np.int64)
    chosen_chars[live] = [len(text) for text in chosen_text[live]]
    rejected_chars[live] = [len(text) for text in rejected_text[live]]

    drop("same_text", chosen_text == rejected_text)
    drop("chosen_judgment_too_long", chosen_chars > (max_chosen_chars if max_chosen_chars is not None else np.inf))
    drop("same_score", (chosen_score == rejected_score) if require_distinct_scores else np.zeros(n_targets, dtype=bool))

    selected = np.flatnonzero(remaining)
    selected_targets = targets.iloc[selected]
    prompt_text = prompts.set_index(PROMPT_ID)[PROMPT].reindex(selected_targets[PROMPT_ID]).to_numpy(dtype=object)
    response_text = responses.set_index(RESPONSE_ID)[RESPONSE].reindex(selected_targets[RESPONSE_ID]).to_numpy(dtype=object)
    for label, texts, ids in (("prompts", prompt_text, selected_targets[PROMPT_ID]), ("responses", response_text, selected_targets[RESPONSE_ID])):
        absent = pd.isna(texts)
        if absent.any():
            raise SchemaError(f"{label}: no text for {show(ids.to_numpy()[absent][0])}")
    pairs = pd.DataFrame(
        {
            KIND: pd.array([KIND_JUDGE] * len(selected), dtype="str"),
            PROMPT_ID: selected_targets[PROMPT_ID].to_numpy(),
            PROMPT: [render_judge_prompt(p, r) for p, r in zip(prompt_text, response_text)],
            CHOSEN: chosen_text[selected],
            REJECTED: rejected_text[selected],
            CHOSEN_ID: elo_ids[chosen_row[selected]],
            REJECTED_ID: elo_ids[rejected_row[selected]],
            CHOSEN_SCORE: chosen_score[selected],
            REJECTED_SCORE: rejected_score[selected],
            CHOSEN_CHARS: chosen_chars[selected],
            REJECTED_CHARS: rejected_chars[selected],
            CHOSEN_ELO: values[chosen_row[selected]],
            REJECTED_ELO: values[rejected_row[selected]],
        },
        columns=list(PAIRS_COLUMNS),
    )
    pairs.attrs["dropped"] = dropped
    return pairs


def _check_targets(targets: pd.DataFrame) -> None:
    require_columns(targets, (PROMPT_ID, RESPONSE_ID), "targets")
    require_no_nulls(targets, (PROMPT_ID, RESPONSE_ID), "targets")
    require_unique(targets, PROMPT_ID, "targets")
    require_unique(targets, RESPONSE_ID, "targets")


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _bradley_terry(battles: np.ndarray, l2: float, max_iterations: int, tolerance: float, target_ids: pd.Index) -> np.ndarray:
    """Strengths e (targets x N) maximising, for every target at once,
    sum_{m,n} B[m,n] log sigmoid(e_m - e_n) - l2/2 * |e|^2. Newton's method with a per-target
    backtracking line search (the objective is strictly concave, so this converges from e = 0);
    a target leaves the batch once its step is below `tolerance`. Padding rows and columns of B
    are zero; their strengths stay exactly 0."""
    n_targets, size, _ = battles.shape
    identity = np.eye(size)

    def objective(matrices: np.ndarray, strengths: np.ndarray) -> np.ndarray:
        gaps = strengths[:, :, None] - strengths[:, None, :]
        return (matrices * _log_sigmoid(gaps)).sum(axis=(1, 2)) - 0.5 * l2 * (strengths * strengths).sum(axis=1)

    strengths = np.zeros((n_targets, size))
    values = objective(battles, strengths)
    active = np.arange(n_targets)
    for _ in range(max_iterations):
        matrices, current, value = battles[active], strengths[active], values[active]
        transposed = matrices.transpose(0, 2, 1)
        gaps = current[:, :, None] - current[:, None, :]
        win_probability = 0.5 * (1.0 + np.tanh(0.5 * gaps))
        gradient = (matrices * (1.0 - win_probability) - transposed * win_probability).sum(axis=2) - l2 * current
        curvature = (matrices + transposed) * win_probability * (1.0 - win_probability)
        # -Hessian = graph Laplacian of the curvatures + l2 * I: symmetric positive definite.
        negative_hessian = identity * (curvature.sum(axis=2) + l2)[:, :, None] - curvature
        step = np.linalg.solve(negative_hessian, gradient[:, :, None])[:, :, 0]
        slope = (gradient * step).sum(axis=1)
        scale = np.ones(len(active))
        for _ in range(60):
            candidate = current + scale[:, None] * step
            candidate_value = objective(matrices, candidate)
            # Armijo test, with slack for rounding: near the optimum the gain is below float resolution.
            accepted = candidate_value - value >= 1e-4 * scale * slope - 1e-13 * (1.0 + np.abs(value))
            if accepted.all():
                break
            scale = np.where(accepted, scale, 0.5 * scale)
        strengths[active] = np.where(accepted[:, None], candidate, current)
        values[active] = np.where(accepted, candidate_value, value)
        active = active[np.abs(scale[:, None] * step).max(axis=1) > tolerance]
        if not len(active):
            return strengths
    raise RuntimeError(
        f"Bradley-Terry fit did not converge in {max_iterations} Newton steps for {len(active)} target(s) "
        f"(first: response_id {show(target_ids[active[0]])}); raise max_iterations or l2"
    )
