"""The Prefect shell's own logic: which faults are retried (also through a real Prefect API), the
artifact keys and what the UI artifacts show."""

from __future__ import annotations

import errno

import httpx
import numpy as np
import pandas as pd
import pytest

from metareward.config import ConfigError, RunConfig
from metareward.stages import ActorPairsResult
from metareward.summaries import ActorPairsSummary
from metareward.storage import StorageError, TransientStorageError
from tasks.reporting import PREVIEW_TEXT_CHARS, artifact_key, preview_rows, summary_markdown
from tasks.retries import is_transient_fault, retry_on_transient_fault


def _http_status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:8000/v1/chat/completions")
    return httpx.HTTPStatusError("server said no", request=request, response=httpx.Response(code, request=request))


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    "fault",
    [
        TransientStorageError("cannot read s3://b/k: connection refused"),
        OSError(errno.ECONNREFUSED, "connection refused"),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        _http_status(503),
        _http_status(429),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        _chained(RuntimeError("engine request failed"), ConnectionResetError("reset by peer")),
    ],
    ids=lambda fault: type(fault).__name__,
)
def test_transient_faults_are_retried(fault):
    assert is_transient_fault(fault)


@pytest.mark.parametrize(
    "fault",
    [
        ValueError("judge.n must be >= 1"),
        ConfigError("demo.yaml: unknown key 'judge.tempreature'"),
        FileNotFoundError(errno.ENOENT, "no such prompt file", "prompts.csv"),
        StorageError("cannot read s3://b/k: access denied"),
        _http_status(400),
        RuntimeError("Expected all tensors to be on the same device"),
    ],
    ids=lambda fault: type(fault).__name__,
)
def test_other_faults_fail_at_once(fault):
    assert not is_transient_fault(fault)


def test_a_task_retries_a_transient_fault_and_fails_at_once_on_a_bad_value(prefect_api):
    from prefect import flow, task

    from tasks.retries import RETRY_OPTIONS

    calls = {"flaky": 0, "bad": 0}
    options = {**RETRY_OPTIONS, "retry_delay_seconds": 0, "retry_jitter_factor": None}

    @task(retry_condition_fn=retry_on_transient_fault, **options)
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise TransientStorageError("cannot write s3://bucket/run/x: connection refused")
        return "done"

    @task(retry_condition_fn=retry_on_transient_fault, **options)
    def bad() -> None:
        calls["bad"] += 1
        raise ValueError("actor.k must be >= 1, got 0")

    @flow
    def pipeline():
        return flaky(return_state=True), bad(return_state=True)

    flaky_state, bad_state = pipeline()
    assert flaky_state.is_completed() and flaky_state.result() == "done" and calls["flaky"] == 3
    assert bad_state.is_failed() and calls["bad"] == 1
    with pytest.raises(ValueError, match="actor.k"):
        bad_state.result()


def test_artifact_keys_are_stable_and_use_only_prefects_characters():
    config = RunConfig(name="Demo_run.v2").for_iteration(2)
    assert artifact_key(config, "meta_judge", "rows") == "demo-run-v2-iter-2-meta-judge-rows"


def test_preview_cuts_long_texts_and_shows_arrays_and_missing_values():
    table = pd.DataFrame(
        {
            "response": ["x" * 1000] + ["short"] * 29,
            "ids": [np.array(["a", "b"])] * 30,
            "score": [float("nan")] + [4.5] * 29,
        }
    )
    rows = preview_rows(table)
    assert len(rows) == 20
    assert len(rows[0]["response"]) == PREVIEW_TEXT_CHARS and rows[1]["response"] == "short"
    assert rows[0]["ids"] == '["a", "b"]'
    assert rows[0]["score"] is None and rows[1]["score"] == 4.5


def test_summary_markdown_lists_counts_and_drops_by_reason():
    config = RunConfig(name="demo").for_iteration(1)
    result = ActorPairsResult(
        stage="actor_pairs",
        uri="/runs/demo/iter-1/actor_pairs",
        uris={"actor_pairs": "/runs/demo/iter-1/actor_pairs"},
        summary=ActorPairsSummary(prompts=5, pairs=3, rho=0.32, dropped={"equal_scores": 2, "same_text": 0}),
    )
    text = summary_markdown(config, result)
    assert "| pairs | 3 |" in text and "| rho | 0.32 |" in text
    assert "| equal_scores | 2 |" in text and "| same_text | 0 |" in text
    empty = summary_markdown(config, result.model_copy(update={"summary": ActorPairsSummary(prompts=5, pairs=0, rho=0.32)}))
    assert "Nothing was dropped." in empty


def test_flow_parameters_are_the_config_models_so_the_ui_renders_a_form():
    from prefect.utilities.callables import parameter_schema

    from flows.iteration import iteration_flow
    from flows.run import run_flow

    run_schema = parameter_schema(run_flow.fn).model_dump_for_openapi()
    assert run_schema["properties"]["config"]["$ref"].endswith("/RunConfig")
    assert {"RunConfig", "PairsConfig", "StorageConfig", "TrainingConfig", "IterationOverrides"} <= set(run_schema["definitions"])
    iteration_schema = parameter_schema(iteration_flow.fn).model_dump_for_openapi()
    assert iteration_schema["properties"]["model"]["$ref"].endswith("/ModelRef")
    assert iteration_schema["required"] == ["config", "iteration", "model"]


def test_refresh_discards_shards_on_the_first_attempt_only(prefect_api):
    from prefect import flow, task

    from tasks.retries import RETRY_OPTIONS
    from tasks.stages import _fresh

    seen: list[bool] = []
    options = {**RETRY_OPTIONS, "retry_delay_seconds": 0, "retry_jitter_factor": None}

    @task(retry_condition_fn=retry_on_transient_fault, **options)
    def sharded_stage() -> None:
        seen.append(_fresh())
        if len(seen) == 1:
            raise TransientStorageError("cannot write s3://bucket/run/x: connection refused")

    @flow
    def pipeline(refresh: bool):
        sharded_stage.with_options(refresh_cache=refresh)()

    pipeline(refresh=True)
    assert seen == [True, False]  # the retry resumes from the shards the first attempt committed
    seen.clear()
    pipeline(refresh=False)
    assert seen == [False, False]
