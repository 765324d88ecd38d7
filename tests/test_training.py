"""The train stage: DPO with real TRL on the real embedded model, and its input rules.

One short training run (two optimizer steps on four hand-written pairs) is shared by the tests
marked `model`; the input checks run without loading any model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from metareward.checkpoints import MANIFEST_NAME, ModelRef, materialize
from metareward.schema import SchemaError
from metareward.training import (
    DROP_REASONS,
    TrainingConfig,
    TrainResult,
    check_pairs,
    completion_logps,
    implicit_reward_margins,
    prepare_examples,
    resolve_precision,
    train_dpo,
)

LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the quiet river bank."] * 12)

GOOD_PAIRS = [
    ("actor", "p-add", "What is 2 + 2?", "2 + 2 = 4.", "2 + 2 is 5, and that is a well-known fact."),
    ("actor", "p-color", "Name a primary color.", "Red is a primary color.", "Bananas are a kind of fruit."),
    ("judge", "p-judge-1", "Score this answer to 'capital of Italy': 'Rome'.", "Correct and concise. Score: 5", "Wrong. Score: 1"),
    ("judge", "p-judge-2", "Score this answer to 'say hello in French': 'Bonjour'.", "Right answer. Score: 5", "Score: 0"),
]
BAD_PAIRS = [
    ("actor", "p-empty", "Tell me a joke.", "   ", "Why did the chicken cross the road?"),
    ("actor", "p-same", "Say yes.", "Yes.", "Yes."),
    ("actor", "p-long-prompt", LONG_TEXT, "Short answer.", "Another short answer."),
    ("actor", "p-long-answer", "Describe a fox.", LONG_TEXT, "A small wild dog."),
]
COLUMNS = ["kind", "prompt_id", "prompt", "chosen", "rejected"]
MAX_LENGTH = 96

# Two full-batch steps at a constant rate: enough for the margins to move, fast on 2 cores.
TEST_CONFIG = TrainingConfig(
    learning_rate=5e-5,
    lr_scheduler_type="constant",
    max_steps=2,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    max_length=MAX_LENGTH,
    logging_steps=1,
    seed=0,
)


def _pairs(rows) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["chosen_score"] = 5.0  # an extra artifact column: ignored by training
    return table


@pytest.fixture(scope="module")
def trained(seed_ref: ModelRef, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    output = tmp_path_factory.mktemp("training") / "iter-1" / "model"
    return train_dpo(_pairs(GOOD_PAIRS + BAD_PAIRS), seed_ref, str(output), TEST_CONFIG)


# --- the real training run ---------------------------------------------------------------------


@pytest.mark.model
def test_counts_of_used_and_dropped_pairs(trained: TrainResult) -> None:
    assert trained.n_pairs_used == 4
    assert trained.n_pairs_used_by_kind == {"actor": 2, "judge": 2}
    assert trained.n_pairs_dropped == {"empty_text": 1, "identical": 1, "prompt_too_long": 1, "too_long": 1}
    assert trained.n_pairs_truncated == 0
    assert trained.n_steps == 2
    assert trained.precision == resolve_precision("auto")


@pytest.mark.model
def test_metrics_are_trl_logging_steps(trained: TrainResult) -> None:
    metrics = trained.metrics
    assert list(metrics["step"]) == [1, 2]
    for column in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "learning_rate"):
        assert column in metrics.columns, column
    first = metrics.iloc[0]
    # Step 1 is measured before any update: policy == reference, so every implicit reward is 0.
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # Step 2 sees the same four pairs after one update on them.
    assert metrics.iloc[1]["rewards/margins"] > 0
    assert metrics.iloc[1]["loss"] < first["loss"]
    assert list(metrics["learning_rate"]) == pytest.approx([5e-5, 5e-5])


@pytest.mark.model
def test_weights_changed(trained: TrainResult, seed_dir: Path) -> None:
    from safetensors import safe_open

    new_dir = materialize(trained.model)
    with safe_open(str(seed_dir / "model.safetensors"), "pt") as before, safe_open(
        str(new_dir / "model.safetensors"), "pt"
    ) as after:
        names = sorted(before.keys())
        assert names == sorted(after.keys())
        checked = [n for n in names if "layers.0." in n or "layers.29." in n or "embed_tokens" in n]
        assert len(checked) >= 10
        changed = [n for n in checked if not before.get_tensor(n).equal(after.get_tensor(n))]
    assert len(changed) >= len(checked) // 2, f"only {changed} of {checked} changed"
    assert any("embed_tokens" in n for n in changed)


@pytest.mark.model
def test_checkpoint_has_manifest_new_hash_and_reloads(trained: TrainResult, seed_ref: ModelRef) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert trained.model.sha256 != seed_ref.sha256
    folder = materialize(trained.model)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == trained.model.sha256
    assert manifest["source"]["kind"] == "dpo"
    assert manifest["source"]["base_sha256"] == seed_ref.sha256
    assert manifest["source"]["n_pairs_used"] == 4
    names = {entry["name"] for entry in manifest["files"]}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(name.endswith(".bin") for name in names)  # no training_args.bin pickle

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


@pytest.mark.model
def test_implicit_reward_margin_grew(trained: TrainResult, seed_ref: ModelRef) -> None:
    pairs = _pairs(GOOD_PAIRS)
    margins = implicit_reward_margins(trained.model, seed_ref, pairs, beta=TEST_CONFIG.beta)
    # Before training the policy is the reference, so every margin was exactly 0 (TRL's step 1
    # above); the saved checkpoint, reloaded, prefers chosen over rejected on the training pairs.
    assert list(margins.index) == list(pairs.index)
    assert margins.mean() > 0.05
    assert (margins > 0).sum() >= 3


@pytest.mark.model
def test_completion_logps_match_trl(trained: TrainResult, seed_ref: ModelRef) -> None:
    # TRL's step 1 ran the base model over exactly these four pairs (one batch, none truncated):
    # its logged batch means must equal ours, so both render and score the completions alike.
    logps = completion_logps(seed_ref, _pairs(GOOD_PAIRS))
    first = trained.metrics.iloc[0]
    assert logps["chosen_logps"].mean() == pytest.approx(first["logps/chosen"], abs=1e-3)
    assert logps["rejected_logps"].mean() == pytest.approx(first["logps/rejected"], abs=1e-3)


# --- input rules that need the tokenizer --------------------------------------------------------


@pytest.mark.model
def test_truncate_mode_keeps_long_pairs_and_counts_them(seed_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(seed_dir))
    config = TEST_CONFIG.model_copy(update={"long_pairs": "truncate"})
    prepared = prepare_examples(_pairs(GOOD_PAIRS + BAD_PAIRS), tokenizer, config)
    assert len(prepared.examples) == 5
    assert prepared.n_truncated == 1
    assert prepared.n_dropped == {"empty_text": 1, "identical": 1, "prompt_too_long": 1, "too_long": 0}
    kept = prepared.examples[-1]
    assert kept["prompt_id"] == "p-long-answer"
    assert kept["prompt"] == [{"role": "user", "content": "Describe a fox."}]
    assert kept["chosen"] == [{"role": "assistant", "content": LONG_TEXT}]
    assert kept["rejected"] == [{"role": "assistant", "content": "A small wild dog."}]
    assert set(prepared.n_dropped) == set(DROP_REASONS)


@pytest.mark.model
def test_no_trainable_pair_left_raises_with_counts(seed_ref: ModelRef, tmp_path: Path) -> None:
    output = tmp_path / "model"
    with pytest.raises(ValueError, match="none of the 4 pairs is trainable.*'empty_text': 1.*'too_long': 1"):
        train_dpo(_pairs(BAD_PAIRS), seed_ref, str(output), TEST_CONFIG)
    assert not output.exists()


# --- bad input: fails before any model is loaded ------------------------------------------------

NOWHERE = ModelRef(uri="/nonexistent/metareward-base", sha256="0" * 64)


def test_empty_pairs_raise() -> None:
    with pytest.raises(ValueError, match="pairs: no rows"):
        train_dpo(pd.DataFrame(columns=COLUMNS), NOWHERE, "/tmp/unused-output", TrainingConfig())


def test_missing_column_is_named() -> None:
    table = _pairs(GOOD_PAIRS).drop(columns=["rejected"])
    with pytest.raises(SchemaError, match="missing column\\(s\\) 'rejected'"):
        train_dpo(table, NOWHERE, "/tmp/unused-output", TrainingConfig())


def test_unknown_kind_is_named() -> None:
    table = _pairs(GOOD_PAIRS)
    table.loc[1, "kind"] = "critic"
    with pytest.raises(SchemaError, match="column 'kind' has value 'critic'"):
        check_pairs(table)


def test_null_and_non_text_values_are_named() -> None:
    table = _pairs(GOOD_PAIRS)
    table.loc[2, "chosen"] = None
    with pytest.raises(SchemaError, match="column 'chosen' has 1 null value"):
        check_pairs(table)
    table = _pairs(GOOD_PAIRS).astype({"prompt": object})
    table.loc[3, "prompt"] = 42
    with pytest.raises(SchemaError, match="column 'prompt' must hold text; row 3 holds int 42"):
        check_pairs(table)


def test_output_must_differ_from_base() -> None:
    with pytest.raises(ValueError, match="is the base checkpoint's location"):
        train_dpo(_pairs(GOOD_PAIRS), NOWHERE, NOWHERE.uri + "/", TrainingConfig())


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="bf16"):
        TrainingConfig(bf16=True)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingConfig(warmup_ratio=1.0)
    with pytest.raises(ValueError, match="long_pairs"):
        TrainingConfig(long_pairs="keep")


def test_precision_resolution_on_this_machine() -> None:
    import torch

    has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_precision("auto") == ("bf16" if has_bf16 else "fp32")
    assert resolve_precision("fp32") == "fp32"
    if not has_bf16:
        with pytest.raises(ValueError, match="precision 'bf16' needs a CUDA GPU"):
            resolve_precision("bf16")
