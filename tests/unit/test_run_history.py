"""Where iteration I starts from (`metareward.runs.base_of_iteration`) and the typed summaries
read back from a stored summary table (`metareward.stages.read_summaries`), on literal records."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from metareward.checkpoints import ModelRef
from metareward.runs import IterationRecord, UnavailableBase, base_of_iteration, promoted_base, trailing_rejections
from metareward.stages import read_summaries

M = [ModelRef(uri=f"/runs/r/iter-{i}/model", sha256=f"{i}" * 64) for i in range(4)]


def _trained(iteration: int, pruned: bool = False, promoted: bool = True) -> IterationRecord:
    return IterationRecord(
        iteration=iteration, complete=True, trained=True, promoted=promoted, base=M[iteration - 1], model=M[iteration], pruned=pruned
    )


def test_iteration_one_starts_from_the_seed_and_later_ones_from_the_checkpoint_before():
    history = [_trained(1), _trained(2), _trained(3)]
    assert base_of_iteration(history, 1, "r") is None
    assert base_of_iteration(history, 2, "r") == M[1]
    assert base_of_iteration(history, 4, "r") == M[3]


def test_a_base_never_trained_or_pruned_is_refused_naming_why():
    with pytest.raises(UnavailableBase, match="iteration 3 starts after iteration 2, but run r has 1 complete trained"):
        base_of_iteration([_trained(1)], 3, "r")
    untrained = IterationRecord(iteration=2, complete=True, trained=False, message="no pairs")
    with pytest.raises(UnavailableBase, match="iteration 3 starts after iteration 2"):
        base_of_iteration([_trained(1), untrained], 3, "r")
    with pytest.raises(UnavailableBase, match="pruned"):
        base_of_iteration([_trained(1, pruned=True), _trained(2)], 2, "r")


def test_an_iteration_whose_model_was_not_promoted_leaves_the_base_where_it_was():
    history = [_trained(1), _trained(2, promoted=False), _trained(3, promoted=False)]
    assert base_of_iteration(history, 3, "r") == M[1]  # iteration 2's M2 was rejected: M1 stays the base
    assert base_of_iteration(history, 4, "r") == M[1]
    assert trailing_rejections(history) == 2 and promoted_base(history).iteration == 1
    assert base_of_iteration([_trained(1, promoted=False)], 2, "r") is None  # M0, which the caller resolves
    with pytest.raises(UnavailableBase, match="M1 .*pruned"):
        base_of_iteration([_trained(1, pruned=True), _trained(2, promoted=False)], 3, "r")


def test_stored_summaries_read_back_typed_including_pipeline_2_checkpoint_strings():
    table = pd.DataFrame(
        {
            "stage": ["judge", "train", "summary"],
            "summary": [
                json.dumps({"responses": 3, "judgments": 9, "statuses": {"ok": 2, "forced": 7}, "shards": 3}),
                json.dumps({"trained": True, "pairs": 4, "model": M[1].model_dump()}),
                json.dumps({"iteration": 1, "base": M[0].model_dump(), "model": M[1].model_dump(), "trained": True}),
            ],
        }
    )
    summaries = read_summaries(table)
    assert summaries.judge.statuses["forced"] == 7 and summaries.judge.shards == 3
    assert summaries.train.model == M[1] and summaries.summary.base == M[0]
    assert summaries.generate is None

    legacy = pd.DataFrame(
        {"stage": ["train"], "summary": [json.dumps({"trained": True, "pairs": 4, "checkpoint": M[1].uri, "checkpoint_sha256": M[1].sha256})]}
    )
    assert read_summaries(legacy).train.model == M[1]
