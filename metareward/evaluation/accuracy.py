"""Judge accuracy (`evaluate_judge_accuracy`): the model under test judges each side of a preference set
(prompt, chosen, rejected; `load_preference_set`: the shipped `metareward/data/preference_pairs.jsonl`
or a user's Parquet / JSONL) with the run's rubric (`metareward.prompts.render_judge_prompt`), one
judgment per side, forced verdicts where parsing fails (`forced` mode). Accuracy is the share of
pairs whose chosen side scored higher among the pairs where both sides have a valid score; ties and
pairs without two valid scores are counted separately."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from metareward import parsing, prompt_sources
from metareward.config import EvaluationConfig
from metareward.engines.base import Engine, Sampling
from metareward.evaluation.comparisons import _seed, _user
from metareward.prompts import render_judge_prompt
from metareward.schema import (
    PROMPT,
    SCORE,
    STATUS,
    STATUS_FORCED,
    STATUS_NO_SCORE,
    STATUS_OK,
    STATUS_OUT_OF_RANGE,
    VALID_STATUSES,
)
from metareward.stages import force_verdicts
from metareward.storage import Store


EMBEDDED = "embedded"
EMBEDDED_PREFERENCE_SET = "preference_pairs.jsonl"

PREFERENCE_COLUMNS = ("pair_id", PROMPT, "chosen", "rejected")
JUDGMENT_STATUSES = (STATUS_OK, STATUS_FORCED, STATUS_NO_SCORE, STATUS_OUT_OF_RANGE)


class PreferenceSetError(ValueError):
    """A preference set that cannot be used; the message names the file and the problem."""


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
