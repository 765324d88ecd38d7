"""The pipeline end to end: the embedded model, a real Prefect API (test harness), storage on a
real S3 server over HTTP on 127.0.0.1 (`rclone serve s3` over a folder on disk).

Two real runs of one tiny iteration (3 prompts, K=3, N=3, 16 tokens per text, shards of one
prompt, 1 DPO step) are shared by the tests, because CI time is finite:

- `main_run` (prefix `e2e-main`): uninterrupted. The tests on it run in file order: its artifacts
  and counts first, then a re-run of the same iteration (all cached, no engine loaded), then rho
  changed (pair selection onward recomputed), then caps that leave no pair (the run stops).
- `killed_run` (prefix `e2e-kill`): `metareward run` in a child process, killed (SIGKILL) as soon
  as the first judge shard is committed; `resumed_run` then stops the S3 server, runs the same
  config again in this process and restarts the server once a task has failed on the outage and
  scheduled its retry. The resumed run must redo no committed shard, end with the judgments
  table of the uninterrupted run, and complete despite the outage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from metareward.config import RunConfig
from metareward.engines import loaded_engines, release_engines
from metareward.schema import (
    JUDGMENT_A_ID,
    JUDGMENT_B_ID,
    JUDGMENT_ID,
    JUDGMENTS_COLUMNS,
    KIND,
    KIND_ACTOR,
    KIND_JUDGE,
    META_JUDGMENTS_COLUMNS,
    N_VALID,
    PAIRS_COLUMNS,
    PROMPT_ID,
    PROMPTS_COLUMNS,
    RESPONSE_ID,
    RESPONSES_COLUMNS,
    SCORES_COLUMNS,
)
from metareward.storage import Store, is_complete, read_artifact, read_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.model]

RUN = "e2e"
PROMPTS, K, N, SHARD_SIZE = 3, 3, 3, 1
ALL_STAGES = ["sample_prompts", "generate", "judge", "meta_judge", "actor_pairs", "judge_pairs", "pre_train_checks", "train", "summary"]
KILL_TIMEOUT_S = 1200


def tiny_config(storage, model_dir: Path, **changes) -> RunConfig:
    """The tiny run, with `changes` merged into its sections (e.g. pairs={"rho": 0.3})."""
    data = {
        "name": RUN,
        "seed": 0,
        "max_iterations": 1,
        "model": str(model_dir),
        "storage": storage.model_dump(mode="json"),
        "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16},
        "prompts": {"source": "embedded", "per_iteration": PROMPTS},
        "actor": {"k": K, "max_tokens": 16},
        "judge": {"n": N, "max_tokens": 16},
        "meta_judge": {"max_tokens": 16},
        # 16 tokens rarely reach "Score: x": forced verdicts keep every judgment valid.
        "verdict_mode": "forced",
        "pairs": {"rho": 0.0},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 1024},
        "shard_size": SHARD_SIZE,
    }
    for section, values in changes.items():
        if isinstance(values, dict):
            data[section] = {**data.get(section, {}), **values}
        else:
            data[section] = values
    return RunConfig.model_validate(data)


def _table(store: Store, name: str, columns) -> pd.DataFrame:
    """A complete artifact of iteration 1, checked against its manifest and its documented columns."""
    uri = store.stage_uri(RUN, 1, name)
    table = read_artifact(store, uri)
    manifest = read_manifest(store, uri)
    assert manifest["rows"] == len(table), name
    assert list(table.columns[: len(columns)]) == list(columns), name
    return table


@pytest.fixture(scope="module")
def main_run(prefect_api, rclone_s3, seed_ref, seed_dir):
    from flows.run import run_flow

    config = tiny_config(rclone_s3.storage_config(prefix="e2e-main"), seed_dir)
    release_engines()
    started = time.perf_counter()
    outcome = run_flow(config)
    return SimpleNamespace(
        config=config, outcome=outcome, store=Store(config.storage), seed=seed_ref, seconds=time.perf_counter() - started
    )


def test_run_writes_every_artifact_with_its_schema_and_consistent_counts(main_run):
    from metareward.runs import read_history

    store, outcome = main_run.store, main_run.outcome
    assert outcome.resumed_after == 0 and len(outcome.iterations) == 1
    iteration = outcome.iterations[0]
    assert list(iteration.states) == ALL_STAGES
    assert set(iteration.states.values()) == {"Completed"}

    prompts = _table(store, "prompts", PROMPTS_COLUMNS)
    responses = _table(store, "responses", RESPONSES_COLUMNS)
    judgments = _table(store, "judgments", JUDGMENTS_COLUMNS)
    scores = _table(store, "scores", SCORES_COLUMNS)
    meta_targets = _table(store, "meta_targets", SCORES_COLUMNS)
    meta_judgments = _table(store, "meta_judgments", META_JUDGMENTS_COLUMNS)
    actor_pairs = _table(store, "actor_pairs", PAIRS_COLUMNS)
    judge_pairs = _table(store, "judge_pairs", PAIRS_COLUMNS)

    assert len(prompts) == PROMPTS and prompts[PROMPT_ID].is_unique
    generated = iteration.stages["generate"].summary
    assert generated.generated == PROMPTS * K
    assert len(responses) == PROMPTS * K - sum(generated.dropped.values())
    assert set(responses[PROMPT_ID]) <= set(prompts[PROMPT_ID]) and responses[RESPONSE_ID].is_unique
    # every response has N judgments, and every judgment belongs to a response
    assert (judgments.groupby(RESPONSE_ID).size() == N).all()
    assert set(judgments[RESPONSE_ID]) == set(responses[RESPONSE_ID]) and judgments[JUDGMENT_ID].is_unique
    assert sorted(scores[RESPONSE_ID]) == sorted(responses[RESPONSE_ID])
    # the meta-judge compares both orders of every pair of a target's valid judgments
    assert set(meta_targets[RESPONSE_ID]) <= set(responses[RESPONSE_ID])
    expected_comparisons = int(sum(n * (n - 1) for n in meta_targets[N_VALID]))
    assert len(meta_judgments) == expected_comparisons > 0
    assert set(meta_judgments[JUDGMENT_A_ID]) | set(meta_judgments[JUDGMENT_B_ID]) <= set(judgments[JUDGMENT_ID])
    # every pair references existing rows
    assert (actor_pairs[KIND] == KIND_ACTOR).all() and (judge_pairs[KIND] == KIND_JUDGE).all()
    assert set(actor_pairs["chosen_id"]) | set(actor_pairs["rejected_id"]) <= set(responses[RESPONSE_ID])
    assert set(judge_pairs["chosen_id"]) | set(judge_pairs["rejected_id"]) <= set(judgments[JUDGMENT_ID])
    assert len(actor_pairs) + len(judge_pairs) > 0

    # a new checkpoint with its own hash, in the run's storage, named by the summary
    new_model = outcome.model
    assert new_model == iteration.model and new_model.sha256 != main_run.seed.sha256
    assert new_model.uri == store.checkpoint_uri(RUN, 1)
    assert store.exists(store.join(new_model.uri, "metareward-manifest.json"))
    summary = read_artifact(store, store.stage_uri(RUN, 1, "summary"))
    assert list(summary["stage"]) == ALL_STAGES  # one row per stage, then the iteration's own
    [record] = read_history(store, RUN)
    assert record.complete and record.trained and record.model == new_model
    assert record.stages.judge.judgments == len(judgments)
    assert record.base == main_run.seed and record.stages.summary.model == new_model

    # the pre-train checks: one row per declared check, in the summary and the UI; the default gate
    # policy `warn` goes on; without the evaluation M_1 is promoted, and that record closes the iteration
    from metareward.checks import CHECKS
    from metareward.gates import read_gate_record, read_promotion

    checks = read_artifact(store, store.stage_uri(RUN, 1, "pre_train_checks"))
    assert list(checks["check"]) == [name for name, check in CHECKS.items() if check.gate == "pre_train"]
    assert set(checks["status"]) <= {"pass", "warn", "fail", "skipped"}
    assert sorted(record.stages.pre_train_checks.failed) == sorted(checks.loc[checks["status"] == "fail", "check"])
    gate = read_gate_record(store, RUN, 1, "pre_train")
    assert gate.decision == ("warned" if record.stages.pre_train_checks.failed else "passed") and gate.policy == "warn"
    promotion = read_promotion(store, RUN, 1)
    assert promotion.promoted and promotion.base == main_run.seed and promotion.model == new_model
    assert record.promoted and iteration.promoted

    # what a person sees in the UI: per stage a summary, a preview of the rows, a link to the
    # Parquet file, and for the long stages a progress bar that ended at 100
    from prefect.artifacts import Artifact

    for stage in ALL_STAGES:
        key = f"{RUN}-iter-1-{stage.replace('_', '-')}"
        assert Artifact.get(f"{key}-summary").type == "markdown"
        rows = json.loads(Artifact.get(f"{key}-rows").data)
        assert 0 < len(rows) <= 20
        assert "data.parquet" in Artifact.get(f"{key}-link").data
    for stage in ("generate", "judge", "meta-judge", "train"):
        assert Artifact.get(f"{RUN}-iter-1-{stage}-progress").data == 100
    judged = json.loads(Artifact.get(f"{RUN}-iter-1-judge-rows").data)
    assert set(JUDGMENTS_COLUMNS) <= set(judged[0])

    # the report task after the summary: the iteration's diagnostics beside its artifacts and in the UI
    diagnostics_uri = store.stage_uri(RUN, 1, "diagnostics")
    diagnostics = read_artifact(store, diagnostics_uri)
    assert diagnostics["iteration"].tolist() == [1]
    assert diagnostics["judge_judgments"].tolist() == [len(judgments)]
    assert diagnostics["actor_pairs"].tolist() == [len(actor_pairs)] and diagnostics["judge_pairs"].tolist() == [len(judge_pairs)]
    assert diagnostics["meta_judgments"].tolist() == [len(meta_judgments)] and diagnostics["train_trained"].tolist() == [True]
    assert all(store.exists(store.join(diagnostics_uri, name)) for name in ("scores.png", "lengths.png"))
    assert "data:image/png;base64," in Artifact.get(f"{RUN}-iter-1-diagnostics-summary").data


def test_rerunning_the_iteration_is_cached_at_every_stage_and_loads_no_engine(main_run, caplog):
    from flows.iteration import iteration_flow

    release_engines()
    store = main_run.store
    records_before = store.ls(store.join(store.run_uri(RUN), "cache"))
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="metareward.engines"):
        outcome = iteration_flow(main_run.config, 1, main_run.seed)
    seconds = time.perf_counter() - started

    assert outcome.states == {stage: "Cached" for stage in ALL_STAGES}
    assert loaded_engines() == []
    assert [record for record in caplog.records if record.name.startswith("metareward.engines")] == []
    assert outcome.model == main_run.outcome.model
    assert store.ls(store.join(store.run_uri(RUN), "cache")) == records_before
    assert seconds < main_run.seconds / 4


def test_iterate_runs_iteration_one_again_from_the_seed_model_and_the_cache(main_run, tmp_path):
    from typer.testing import CliRunner

    from metareward.cli import app

    config_file = tmp_path / "main.yaml"
    config_file.write_text(yaml.safe_dump(main_run.config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["iterate", str(config_file), "--iteration", "1"])
    assert result.exit_code == 0, result.output
    states = ", ".join(f"{stage} Cached" for stage in ALL_STAGES)
    assert f"Iteration 1: {states}" in " ".join(result.output.split()), result.output


def test_changing_rho_recomputes_pair_selection_and_what_follows_only(main_run):
    from flows.iteration import iteration_flow

    config = tiny_config(main_run.config.storage, Path(main_run.config.model), pairs={"rho": 0.3})
    outcome = iteration_flow(config, 1, main_run.seed)

    recomputed = {stage for stage, state in outcome.states.items() if state != "Cached"}
    assert recomputed == {"actor_pairs", "pre_train_checks", "train", "summary"}
    assert set(outcome.states.values()) <= {"Cached", "Completed"}
    manifest = read_manifest(main_run.store, main_run.store.stage_uri(RUN, 1, "actor_pairs"))
    assert manifest["config"]["pairs"]["rho"] == 0.3


def test_the_run_flow_starts_again_at_an_iteration_and_refuses_a_base_it_lacks(main_run):
    from flows.run import run_flow
    from metareward.runs import UnavailableBase

    config = tiny_config(main_run.config.storage, Path(main_run.config.model), pairs={"rho": 0.3})
    rerun = run_flow(config, start_iteration=1)
    assert [ran.iteration for ran in rerun.iterations] == [1] and rerun.resumed_after == 0
    assert rerun.iterations[0].states == {stage: "Cached" for stage in ALL_STAGES}
    assert rerun.iterations[0].summary.base == main_run.seed

    with pytest.raises(UnavailableBase, match="iteration 3 starts after iteration 2"):
        run_flow(config.model_copy(update={"max_iterations": 3}), start_iteration=3)
    assert main_run.store.list_iterations(RUN) == [1]  # refused before any stage ran


def test_an_iteration_without_pairs_stops_the_run_with_a_message(main_run):
    from flows.iteration import iteration_flow
    from flows.run import run_flow

    no_pairs = {"max_chosen_chars": 1, "max_chosen_judgment_chars": 1}
    config = tiny_config(main_run.config.storage, Path(main_run.config.model), pairs=no_pairs)
    outcome = iteration_flow(config, 1, main_run.seed)
    assert outcome.model is None and "no preference pairs" in outcome.message
    assert outcome.states["generate"] == "Cached" and outcome.states["train"] == "Completed"

    two_iterations = config.model_copy(update={"max_iterations": 2})
    run = run_flow(two_iterations)
    assert run.iterations == [] and run.resumed_after == 1
    assert "iteration 1 trained no model" in run.stopped
    assert main_run.store.list_iterations(RUN) == [1]


# ---- killed during judging, resumed through a storage outage ----------------------------------


def _judge_shards(store: Store) -> list[str]:
    folder = store.join(store.stage_uri(RUN, 1, "judgments"), "shards")
    if not store.exists(folder):
        return []
    return sorted(uri.rsplit("/", 1)[-1] for uri in store.ls(folder) if uri.endswith(".parquet"))


@pytest.fixture(scope="module")
def killed_run(prefect_api, rclone_s3, seed_dir, tmp_path_factory):
    # A short lease TTL: the killed command's lease is taken over seconds after it dies.
    config = tiny_config(rclone_s3.storage_config(prefix="e2e-kill", lease_ttl_s=5.0, lease_renew_s=1.0), seed_dir)
    store = Store(config.storage)
    folder = tmp_path_factory.mktemp("killed-run")
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    log_path = folder / "metareward-run.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "metareward.cli", "run", str(config_path)],
            env=env,
            cwd=folder,  # as a user would: outside the checkout (Prefect also reads ./pyproject.toml)
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not _judge_shards(store):
            if child.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no judge shard before the child ended or timed out; its log:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    done = _judge_shards(store)
    assert child.returncode == -signal.SIGKILL
    assert not is_complete(store, store.stage_uri(RUN, 1, "judgments"))
    return SimpleNamespace(config=config, store=store, shards_done=done, log=log_path, pid=child.pid)


class _RetryWatch(logging.Handler):
    """Sets `scheduled` when a Prefect task run logs that it failed and schedules a retry."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.scheduled = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Retry" in message and "will start" in message:
            self.messages.append(message)
            self.scheduled.set()


class _Lines(logging.Handler):
    """Keeps every message logged to it."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def resumed_run(killed_run, rclone_s3):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.run import run_flow

    from metareward.lease import read_lease

    # The killed command left its writer lease: refused until its TTL has passed, then taken over.
    left = read_lease(killed_run.store, RUN)
    assert left is not None and left.pid == killed_run.pid, left
    time.sleep(max(0.0, left.expires_at - time.time()) + 0.5)
    watch = _RetryWatch()
    task_logger = logging.getLogger("prefect.task_runs")
    task_logger.addHandler(watch)
    lease_log = _Lines()
    logging.getLogger("metareward.lease").addHandler(lease_log)

    def restart_after_retry():
        watch.scheduled.wait(timeout=300)
        rclone_s3.start()

    rclone_s3.stop()
    restarter = threading.Thread(target=restart_after_retry, daemon=True)
    restarter.start()
    try:
        state = run_flow(killed_run.config, return_state=True)
    finally:
        task_logger.removeHandler(watch)
        logging.getLogger("metareward.lease").removeHandler(lease_log)
        restarter.join(timeout=330)
        rclone_s3.start()  # a no-op when the thread did it
    outcome = state.result()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return SimpleNamespace(outcome=outcome, state=state, watch=watch, task_runs=task_runs, lease_log=lease_log.messages)


def test_killed_run_resumes_without_redoing_committed_shards(main_run, killed_run, resumed_run):
    total_shards = math.ceil(PROMPTS / SHARD_SIZE)
    assert 1 <= len(killed_run.shards_done) < total_shards
    [iteration] = resumed_run.outcome.iterations
    assert iteration.states["generate"] == "Cached"  # committed before the kill
    judged = iteration.stages["judge"].summary
    assert judged.shards == total_shards
    assert judged.shards_computed == total_shards - len(killed_run.shards_done)

    def judgments(store: Store) -> pd.DataFrame:
        table = read_artifact(store, store.stage_uri(RUN, 1, "judgments"))
        return table.sort_values(JUDGMENT_ID).reset_index(drop=True)

    pd.testing.assert_frame_equal(judgments(killed_run.store), judgments(main_run.store))
    taken = [line for line in resumed_run.lease_log if "took over the lease of run e2e left by" in line]
    assert taken and f"/{killed_run.pid} (expired at " in taken[0], resumed_run.lease_log


def test_a_storage_outage_is_retried_and_the_run_completes(resumed_run, killed_run):
    assert resumed_run.watch.scheduled.is_set(), "no task failed on the stopped S3 server"
    retried = [run for run in resumed_run.task_runs if run.run_count > 1]
    assert retried, [(run.name, run.run_count) for run in resumed_run.task_runs]
    assert resumed_run.state.is_completed()
    outcome = resumed_run.outcome
    assert outcome.model is not None and outcome.model.uri == killed_run.store.checkpoint_uri(RUN, 1)
    assert is_complete(killed_run.store, killed_run.store.stage_uri(RUN, 1, "summary"))
