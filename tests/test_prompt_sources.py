"""Prompt pools (embedded set, user files in three formats, locally and on real S3 servers) and sampling."""

from __future__ import annotations

import io
import json
import math
import uuid
from collections import Counter
from importlib import resources

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metareward.hashing import prompt_id_of
from metareward.prompt_sources import (
    PromptSourceError,
    heldout_prompts,
    load_prompt_pool,
    sample_prompts,
)
from metareward.storage import StorageConfig, Store

PROMPTS = [
    "Name three primary colors.",
    "What is 7 times 8?",
    "Write a haiku about rain.",
    "Explain what an API is.",
    "Summarize: the cat sat on the mat, then slept.",
]


def _pool(n: int) -> pd.DataFrame:
    texts = [f"Prompt number {i}: say something about {i}." for i in range(n)]
    return pd.DataFrame({"prompt_id": [prompt_id_of(t) for t in texts], "prompt": texts})


def _encode(frame: pd.DataFrame, file_format: str) -> bytes:
    if file_format == "parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    if file_format == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in frame.to_dict(orient="records")).encode()
    return frame.to_csv(index=False).encode()


# ------------------------------------------------------------------------------------------------
# the embedded set


def test_the_embedded_prompt_set_is_large_varied_and_well_formed():
    raw = resources.files("metareward").joinpath("data", "prompts.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in raw.splitlines()]
    assert len(records) >= 120
    assert all(set(record) == {"prompt_id", "prompt", "category"} for record in records)
    categories = Counter(record["category"] for record in records)
    assert {"factual", "howto", "writing", "math", "reasoning", "coding", "advice", "summarize", "classify"} <= set(categories)
    assert all(count >= 3 for count in categories.values())
    assert all(record["prompt_id"] == prompt_id_of(record["prompt"]) for record in records)
    assert all(5 <= len(record["prompt"]) <= 400 for record in records)

    pool = load_prompt_pool("embedded")
    assert load_prompt_pool(None).equals(pool)
    assert list(pool.columns) == ["prompt_id", "prompt"]
    assert len(pool) == len(records)
    assert pool["prompt_id"].is_unique and pool["prompt"].is_unique
    assert pool["prompt"].tolist() == [record["prompt"] for record in records]


# ------------------------------------------------------------------------------------------------
# user files


@pytest.mark.parametrize("file_format", ["parquet", "jsonl", "csv"])
def test_local_files_in_every_format(tmp_path, file_format):
    with_ids = pd.DataFrame({"prompt_id": [f"id-{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS, "note": "x"})
    path = tmp_path / f"prompts.{file_format}"
    path.write_bytes(_encode(with_ids, file_format))
    pool = load_prompt_pool(str(path))
    assert pool.to_dict(orient="list") == {"prompt_id": [f"id-{i}" for i in range(5)], "prompt": PROMPTS}

    # without a prompt_id column the id is the stable hash of the text
    path.write_bytes(_encode(pd.DataFrame({"prompt": PROMPTS}), file_format))
    pool = load_prompt_pool(f"file://{path}")
    assert pool["prompt_id"].tolist() == [prompt_id_of(text) for text in PROMPTS]


def test_numeric_prompt_ids_become_text(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt_id,prompt\n1,First\n2,Second\n")
    assert load_prompt_pool(str(path))["prompt_id"].tolist() == ["1", "2"]
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt_id": 10, "prompt": "First"}\n\n{"prompt_id": 11, "prompt": "Second"}\n')
    assert load_prompt_pool(str(path))["prompt_id"].tolist() == ["10", "11"]


@pytest.mark.parametrize("file_format", ["parquet", "jsonl", "csv"])
def test_files_in_object_storage_on_moto(moto_s3, file_format):
    store = Store(moto_s3.storage_config(prefix=f"prompts-{uuid.uuid4().hex[:8]}"))
    uri = store.join(store.root, f"pool.{file_format}")
    store.write_bytes(_encode(pd.DataFrame({"prompt": PROMPTS}), file_format), uri)
    pool = load_prompt_pool(uri, store=store)
    assert pool["prompt"].tolist() == PROMPTS
    assert pool["prompt_id"].tolist() == [prompt_id_of(text) for text in PROMPTS]


def test_a_file_on_rclone_read_through_a_local_run_store_uses_the_environment(rclone_s3, monkeypatch, tmp_path):
    """The run stores artifacts locally but the prompts live in a bucket: credentials and endpoint
    come from the standard AWS environment variables."""
    key = f"{rclone_s3.bucket}/prompts-{uuid.uuid4().hex[:8]}/pool.jsonl"
    rclone_s3.fs().pipe_file(key, _encode(pd.DataFrame({"prompt": PROMPTS}), "jsonl"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", rclone_s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rclone_s3.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", rclone_s3.endpoint_url)
    local_store = Store(StorageConfig(root=str(tmp_path)))
    pool = load_prompt_pool(f"s3://{key}", store=local_store)
    assert pool["prompt"].tolist() == PROMPTS
    with pytest.raises(PromptSourceError, match=f"prompt file s3://{rclone_s3.bucket}/absent.csv does not exist"):
        load_prompt_pool(f"s3://{rclone_s3.bucket}/absent.csv", store=local_store)


@pytest.mark.parametrize(
    "file_name, content, message",
    [
        ("p.csv", b"text\nhello\n", r"no 'prompt' column \(it has 'text'\)"),
        ("p.csv", b"prompt\nhello\n\n   \nbye\n", r"column 'prompt' is empty or not text at row 2 \(line 4\) \(1 of 3 rows"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": 5}\n{"prompt": ""}\n', r"column 'prompt' is empty or not text at row 2 \(line 2\), row 3 \(line 3\)"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n', r"line 2, column 15 is not valid JSON \(Expecting ',' delimiter\)"),
        ("p.jsonl", b'{"prompt": "a"}\n["b"]\n', r"line 2 is a JSON list, not an object"),
        ("p.csv", b"prompt_id,prompt\nx,one\ny,two\nx,three\n", r"column 'prompt_id' holds 'x' at row 1 \(line 2\), row 3 \(line 4\)"),
        ("p.csv", b"prompt_id,prompt\nx,one\n,two\n", r"column 'prompt_id' is empty at row 2 \(line 3\)"),
        ("p.csv", b"prompt\nsame\nother\nsame\n", r"column 'prompt' holds 'same' at row 1 \(line 2\), row 3 \(line 4\)"),
        ("p.csv", b"prompt\nok\nhas,extra\n", r"row 2 \(line 3\) has more fields than the header"),
        ("p.csv", b"prompt\n", r"holds no prompts"),
        ("p.parquet", b"PAR1 but not really", r"is not a readable Parquet file"),
        ("p.jsonl", b"\xff\xfe\x00bad", r"is not UTF-8 text"),
        ("p.txt", b"prompt\nhello\n", r"unsupported extension '.txt'; use .parquet, .jsonl"),
    ],
)
def test_bad_prompt_files_are_named_with_their_problem(tmp_path, file_name, content, message):
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(PromptSourceError, match=message) as caught:
        load_prompt_pool(str(path))
    assert str(path) in str(caught.value)


def test_non_text_prompts_in_parquet_and_missing_files(tmp_path):
    path = tmp_path / "numbers.parquet"
    pd.DataFrame({"prompt": [1, 2, 3]}).to_parquet(path)
    with pytest.raises(PromptSourceError, match=r"column 'prompt' is empty or not text at row 1, row 2, row 3 \(3 of 3 rows"):
        load_prompt_pool(str(path))
    with pytest.raises(PromptSourceError, match=r"prompt file .*nowhere.csv does not exist"):
        load_prompt_pool(str(tmp_path / "nowhere.csv"))
    with pytest.raises(PromptSourceError, match="protocol 'gcs' is not supported"):
        load_prompt_pool("gcs://bucket/prompts.csv")


# ------------------------------------------------------------------------------------------------
# sampling


def test_holdout_is_never_sampled_and_iterations_are_disjoint_while_the_pool_lasts():
    pool = _pool(100)  # 10 held out, 90 to train on
    heldout = set(heldout_prompts(pool, seed=3, holdout_fraction=0.1)["prompt_id"])
    assert len(heldout) == 10
    samples = [sample_prompts(pool, i, 30, seed=3, holdout_fraction=0.1) for i in (1, 2, 3)]
    seen = [set(sample["prompt_id"]) for sample in samples]
    assert all(len(ids) == 30 for ids in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set.union(*seen) == set(pool["prompt_id"]) - heldout
    assert [sample.attrs["pass"] for sample in samples] == [0, 0, 0]
    assert all(list(sample.columns) == ["prompt_id", "prompt"] for sample in samples)
    # the texts travel with their ids
    by_id = dict(zip(pool["prompt_id"], pool["prompt"]))
    assert all(by_id[pid] == text for sample in samples for pid, text in zip(sample["prompt_id"], sample["prompt"]))


def test_when_the_pool_runs_out_a_new_pass_starts_and_prompts_repeat_only_across_iterations():
    pool = _pool(20)  # 2 held out, 18 to train on: iterations of 5 -> 3 per pass, 3 left unused
    samples = [sample_prompts(pool, i, 5, seed=0, holdout_fraction=0.1) for i in range(1, 8)]
    assert [sample.attrs["pass"] for sample in samples] == [0, 0, 0, 1, 1, 1, 2]
    assert all(sample["prompt_id"].is_unique for sample in samples)
    first_pass = [set(sample["prompt_id"]) for sample in samples[:3]]
    assert len(set.union(*first_pass)) == 15
    heldout = set(heldout_prompts(pool, 0, 0.1)["prompt_id"])
    assert all(not (set(sample["prompt_id"]) & heldout) for sample in samples)
    # varying sizes (per-iteration overrides) shift the later slices
    resized = sample_prompts(pool, 3, 5, seed=0, holdout_fraction=0.1, earlier_sizes=[10, 5])
    assert resized.attrs["pass"] == 1
    assert sample_prompts(pool, 2, 8, seed=0, holdout_fraction=0.1, earlier_sizes=[10]).attrs["pass"] == 0


def test_sampling_with_replacement_draws_each_iteration_from_the_whole_training_pool():
    pool = _pool(50)
    heldout = set(heldout_prompts(pool, 1, 0.2)["prompt_id"])
    samples = [sample_prompts(pool, i, 30, seed=1, holdout_fraction=0.2, without_replacement=False) for i in (1, 2)]
    assert all(len(sample) == 30 and sample["prompt_id"].is_unique for sample in samples)
    assert all(not (set(sample["prompt_id"]) & heldout) for sample in samples)
    assert set(samples[0]["prompt_id"]) & set(samples[1]["prompt_id"])  # 30 of 40 twice must overlap
    assert set(samples[0]["prompt_id"]) != set(samples[1]["prompt_id"])


def test_sampling_errors_name_the_problem():
    pool = _pool(10)
    with pytest.raises(ValueError, match="iteration 1 asks for 10 prompts but the training pool holds 9"):
        sample_prompts(pool, 1, 10, seed=0, holdout_fraction=0.1)
    with pytest.raises(ValueError, match="iteration must be an integer >= 1"):
        sample_prompts(pool, 0, 2, seed=0, holdout_fraction=0.1)
    with pytest.raises(ValueError, match=r"holdout_fraction must be in \[0, 1\)"):
        sample_prompts(pool, 1, 2, seed=0, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="leaves no prompt for training"):
        heldout_prompts(_pool(1), 0, 0.5)
    with pytest.raises(ValueError, match=r"earlier_sizes must give the sizes of iterations 1..2"):
        sample_prompts(pool, 3, 2, seed=0, holdout_fraction=0.1, earlier_sizes=[2])
    duplicated = pd.concat([pool, pool.head(1)], ignore_index=True)
    with pytest.raises(ValueError, match="occurs more than once"):
        sample_prompts(duplicated, 1, 2, seed=0, holdout_fraction=0.1)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=60),
    seed=st.integers(min_value=0, max_value=2**31),
    holdout_fraction=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
    per_iteration=st.integers(min_value=1, max_value=20),
    iterations=st.integers(min_value=1, max_value=5),
    shuffle_seed=st.integers(min_value=0, max_value=1000),
)
def test_sampling_properties(n, seed, holdout_fraction, per_iteration, iterations, shuffle_seed):
    pool = _pool(n)
    shuffled = pool.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
    heldout = heldout_prompts(pool, seed, holdout_fraction)
    assert len(heldout) == (math.ceil(holdout_fraction * n) if holdout_fraction else 0)
    assert heldout.equals(heldout_prompts(shuffled, seed, holdout_fraction))
    n_train = n - len(heldout)
    if per_iteration > n_train:
        with pytest.raises(ValueError, match="asks for"):
            sample_prompts(pool, 1, per_iteration, seed, holdout_fraction)
        return
    per_pass = n_train // per_iteration
    seen_this_pass: set[str] = set()
    for iteration in range(1, iterations + 1):
        sample = sample_prompts(pool, iteration, per_iteration, seed, holdout_fraction)
        # deterministic whatever the input row order
        assert sample.equals(sample_prompts(shuffled, iteration, per_iteration, seed, holdout_fraction))
        ids = set(sample["prompt_id"])
        assert len(ids) == per_iteration == len(sample)
        assert not ids & set(heldout["prompt_id"])
        assert sample.attrs["pass"] == (iteration - 1) // per_pass
        if (iteration - 1) % per_pass == 0:
            seen_this_pass = set()
        assert not ids & seen_this_pass  # disjoint within a pass
        seen_this_pass |= ids


def test_another_seed_gives_another_split_and_sample():
    pool = _pool(200)
    assert set(heldout_prompts(pool, 1, 0.1)["prompt_id"]) != set(heldout_prompts(pool, 2, 0.1)["prompt_id"])
    assert set(sample_prompts(pool, 1, 20, 1, 0.1)["prompt_id"]) != set(sample_prompts(pool, 1, 20, 2, 0.1)["prompt_id"])
