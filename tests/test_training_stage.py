"""The train stage (`metareward.stages.train`) with the training options of issue 5: mixing of
judge pairs, LoRA with its adapter beside M_i, the metrics table the UI previews; and a missing
pairs artifact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.fixtures import stage_calls as stages
from metareward.checkpoints import materialize
from metareward.schema import PAIRS_COLUMNS
from metareward.storage import Store, read_artifact
from tasks.reporting import preview_rows
from tests.test_stages import tiny_config, write_input
from tests.test_training import GOOD_PAIRS, MAX_LENGTH

RUN = "stages-test"


def _pairs_table(rows) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=["kind", "prompt_id", "prompt", "chosen", "rejected"])
    count = len(table)
    table["chosen_id"] = [f"c{index}" for index in range(count)]
    table["rejected_id"] = [f"r{index}" for index in range(count)]
    table["chosen_score"] = 5.0
    table["rejected_score"] = 1.0
    table["chosen_chars"] = table["chosen"].str.len()
    table["rejected_chars"] = table["rejected"].str.len()
    table["chosen_elo"] = np.where(table["kind"] == "judge", 10.0, np.nan)
    table["rejected_elo"] = np.where(table["kind"] == "judge", -10.0, np.nan)
    return table[list(PAIRS_COLUMNS)]


@pytest.mark.model
def test_train_stage_mixes_trains_lora_and_reports(tmp_path, seed_ref):
    training = {
        "max_steps": 1,
        "per_device_train_batch_size": 3,
        "gradient_accumulation_steps": 1,
        "max_length": MAX_LENGTH,
        "learning_rate": 1e-3,
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "max_judge_pairs": 1,
    }
    run_config = tiny_config(tmp_path, training=training)
    config = run_config.for_iteration(1)
    store = Store(run_config.storage)
    actor_uri = store.stage_uri(RUN, 1, "actor_pairs")
    judge_uri = store.stage_uri(RUN, 1, "judge_pairs")
    write_input(store, actor_uri, _pairs_table([row for row in GOOD_PAIRS if row[0] == "actor"]), "actor_pairs")
    write_input(store, judge_uri, _pairs_table([row for row in GOOD_PAIRS if row[0] == "judge"]), "judge_pairs")

    result = stages.train(store, config, seed_ref, actor_uri, judge_uri)

    summary = result.summary
    assert summary.trained is True and summary.pairs == 4
    assert summary.mixing == {"actor_available": 2, "judge_available": 2, "actor_used": 2, "judge_used": 1, "judge_left_out": 1}
    assert summary.pairs_used_by_kind == {"actor": 2, "judge": 1}
    assert summary.adapter.uri == store.stage_uri(RUN, 1, "adapter")
    assert summary.resumed_from_step == 0 and summary.processes == 1
    assert result.model.uri == store.checkpoint_uri(RUN, 1) and result.model.sha256 != seed_ref.sha256
    assert (materialize(result.model).parent / "adapter" / "adapter_model.safetensors").is_file()
    metrics = read_artifact(store, result.uri)
    shown = set(preview_rows(metrics)[0])
    for column in ("step", "loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert column in metrics.columns and column in shown, column


def test_missing_pairs_artifact_is_named(tmp_path):
    from metareward.checkpoints import ModelRef

    run_config = tiny_config(tmp_path)
    store = Store(run_config.storage)
    missing = store.stage_uri(RUN, 1, "actor_pairs")
    nowhere = ModelRef(uri=str(tmp_path / "no-model-here"), sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match=f"artifact {missing} is not complete"):
        stages.train(store, run_config.for_iteration(1), nowhere, missing, None)
