"""The gates through a real Prefect API (test harness) on the embedded model: the pre-train gate's
policies (stop, approve: approved, rejected, timed out, cancelled) and promotion after the
evaluation's gate, through a resume too.

One tiny run (3 prompts, K=3, N=2, no meta-judge, 1 DPO step) in a local folder is shared, because
CI time is finite: iteration 1 is trained once with the default `warn` policies; the tests then run
iteration 2 under other gate settings, in file order. Only the first computes iteration 2's stages
(with the engines loaded, which its gate releases before it waits; they are cached after it: the gate's policy and the thresholds are in no stage's fingerprint but
the checks'); a failing check is forced by a `training_pairs` threshold no tiny run can meet, varied
per test so that each asks a person anew (a decision is reused only for the same checks).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from metareward.config import RunConfig
from metareward.gates import GateDecision, pause_key, read_gate_record, read_promotion
from metareward.storage import Store, is_complete

pytestmark = [pytest.mark.e2e, pytest.mark.model]

RUN = "gated"
PAUSE_WAIT_S = 600


def gated_config(root: Path, model_dir: Path, fail_below: float | None = None, **changes) -> RunConfig:
    """The tiny run; `fail_below` makes the `training_pairs` check fail (a tiny run has a few pairs)."""
    data = {
        "name": RUN,
        "max_iterations": 2,
        "model": str(model_dir),
        "storage": {"root": str(root)},
        "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16},
        "prompts": {"per_iteration": 3},
        "actor": {"k": 3, "max_tokens": 16},
        "judge": {"n": 2, "max_tokens": 16},
        "verdict_mode": "forced",
        "pairs": {"train_judge_pairs": False},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 1024},
        "evaluation": {"max_prompts": 2, "max_tokens": 8, "judge_max_tokens": 8, "max_pairs": 2, "bootstrap_samples": 50},
        "checks": {},
    }
    if fail_below is not None:
        data["checks"]["thresholds"] = {"training_pairs": {"warn": fail_below, "fail": fail_below}}
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return RunConfig.model_validate(data)


def approve_gate(timeout_s: int = PAUSE_WAIT_S) -> dict:
    return {"policy": "approve", "timeout_s": timeout_s}


@pytest.fixture(scope="module")
def gated(prefect_api, seed_ref, seed_dir, tmp_path_factory):
    from flows.run import run_flow

    root = tmp_path_factory.mktemp("gated") / "runs"
    outcome = run_flow(gated_config(root, seed_dir, max_iterations=1))
    [first] = outcome.iterations
    assert first.promoted and first.model is not None
    return SimpleNamespace(root=root, model_dir=seed_dir, store=Store(gated_config(root, seed_dir).storage), m1=first.model)


class FlowInThread:
    """`run_flow(config)` on a thread, so that this one can answer its gates through the API."""

    def __init__(self, config: RunConfig):
        from flows.run import run_flow

        self.outcome, self.error = None, None

        def target() -> None:
            try:
                self.outcome = run_flow(config)
            except BaseException as error:  # handed to the test
                self.error = error

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def paused(self, gate: str, iteration: int = 2):
        """The flow run waiting at `gate` (its Paused state carries the gate's pause key)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType

        key = pause_key(RUN, iteration, gate)
        deadline = time.monotonic() + PAUSE_WAIT_S
        while time.monotonic() < deadline:
            assert self.thread.is_alive(), f"the run ended before pausing at {gate}: {self.error!r} {self.outcome!r}"
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        name=FlowRunFilterName(any_=[f"{RUN}-iter-{iteration}"]),
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
                    )
                )
            waiting = [run for run in runs if run.state.state_details.pause_key == key]
            if waiting:
                return waiting[0]
            time.sleep(0.5)
        raise AssertionError(f"no flow run paused at {key} within {PAUSE_WAIT_S} s")

    def finished(self, within_s: float = PAUSE_WAIT_S):
        self.thread.join(within_s)
        assert not self.thread.is_alive(), "the run did not end"
        return self.outcome, self.error


def answer(flow_run, approve: bool, reason: str) -> None:
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(flow_run.id, run_input=GateDecision(approve=approve, reason=reason, by="tester").model_dump())


def test_an_approve_gate_rejected_through_the_api_stops_and_its_answer_is_kept(gated):
    from flows.gates import GateStopped
    from flows.run import run_flow
    from metareward.engines import loaded_engines

    config = gated_config(gated.root, gated.model_dir, fail_below=1e9, checks={"pre_train": approve_gate()})
    running = FlowInThread(config)
    paused = running.paused("pre_train")
    # Iteration 2's stages ran for real (engines loaded): nothing waits holding a model in memory.
    assert loaded_engines() == []
    answer(paused, approve=False, reason="scores look inflated")
    outcome, error = running.finished()
    assert isinstance(error, GateStopped) and "rejected by tester (scores look inflated)" in str(error)
    record = read_gate_record(gated.store, RUN, 2, "pre_train")
    assert (record.decision, record.by, record.reason) == ("rejected", "tester", "scores look inflated")
    assert not gated.store.exists(gated.store.checkpoint_uri(RUN, 2))

    # The same checks again: the stored answer stands, nobody is asked (a pause would time out in 5 s).
    again = gated_config(gated.root, gated.model_dir, fail_below=1e9, checks={"pre_train": approve_gate(timeout_s=5)})
    with pytest.raises(GateStopped, match="rejected by tester"):
        run_flow(again)


def test_failing_checks_under_the_stop_policy_end_the_run_before_training(gated):
    from flows.gates import GateStopped
    from flows.run import run_flow
    from metareward.runs import read_history

    config = gated_config(gated.root, gated.model_dir, fail_below=1e9, checks={"pre_train": {"policy": "stop"}})
    with pytest.raises(GateStopped, match=r"pre_train gate of iteration 2: checks failed: training_pairs \d+ \(fail below 1e\+09\) \(policy stop\)"):
        run_flow(config)
    store = gated.store
    assert is_complete(store, store.stage_uri(RUN, 2, "pre_train_checks"))
    assert not is_complete(store, store.stage_uri(RUN, 2, "train")) and not store.exists(store.checkpoint_uri(RUN, 2))
    record = read_gate_record(store, RUN, 2, "pre_train")
    assert record.decision == "stopped" and record.failed == ["training_pairs"]
    assert [item.complete for item in read_history(store, RUN)] == [True, False]


def test_a_gate_nobody_answers_stops_the_run_naming_the_gate(gated):
    from flows.gates import GateStopped
    from flows.run import run_flow

    config = gated_config(gated.root, gated.model_dir, fail_below=2e9, checks={"pre_train": approve_gate(timeout_s=3)})
    with pytest.raises(GateStopped, match="pre_train gate of iteration 2: nobody approved or rejected it within 3 s"):
        run_flow(config)
    assert read_gate_record(gated.store, RUN, 2, "pre_train").decision == "timed_out"


def test_cancelling_a_waiting_flow_run_stops_it(gated):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from flows.gates import GateStopped

    config = gated_config(gated.root, gated.model_dir, fail_below=3e9, checks={"pre_train": approve_gate()})
    running = FlowInThread(config)
    paused = running.paused("pre_train")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(paused.id, Cancelled(message="cancelled by a person in the UI"), force=True)
    outcome, error = running.finished(within_s=60)
    assert isinstance(error, GateStopped) and "cancelled" in str(error), (outcome, error)
    assert read_gate_record(gated.store, RUN, 2, "pre_train").decision == "cancelled"


def test_an_approved_gate_trains_and_a_rejected_evaluation_keeps_the_base(gated):
    from flows.evaluate import evaluate_flow
    from metareward.runs import base_of_iteration, read_history

    config = gated_config(
        gated.root,
        gated.model_dir,
        fail_below=4e9,
        keep_last_checkpoints=1,
        evaluation={"at_end_of_iteration": True},
        checks={
            "pre_train": approve_gate(),
            "post_evaluation": approve_gate(),
            # a win rate of 2 is out of reach: the post-evaluation gate fails
            "thresholds": {"training_pairs": {"warn": 4e9, "fail": 4e9}, "lc_win_rate": {"warn": 2.0, "fail": 2.0, "min_count": 0}},
        },
    )
    running = FlowInThread(config)
    answer(running.paused("pre_train"), approve=True, reason="forced verdicts are expected here")
    answer(running.paused("post_evaluation"), approve=False, reason="M2 loses to M1")
    outcome, error = running.finished()
    assert error is None, error
    [second] = outcome.iterations
    store = gated.store
    assert second.model is not None and store.exists(store.checkpoint_uri(RUN, 2))  # trained after the approval
    assert not second.promoted and second.promotion_reason == "rejected by tester (M2 loses to M1)"
    assert outcome.model == gated.m1  # the run's newest promoted checkpoint
    assert read_gate_record(store, RUN, 2, "pre_train").decision == "approved"
    promotion = read_promotion(store, RUN, 2)
    assert (promotion.promoted, promotion.base, promotion.model) == (False, gated.m1, second.model)
    # keep_last_checkpoints 1 keeps the newest (M2) and never the base the next iteration needs (M1)
    assert store.exists(store.checkpoint_uri(RUN, 1))

    history = read_history(store, RUN)
    assert [(item.complete, item.promoted) for item in history] == [(True, True), (True, False)]
    assert base_of_iteration(history, 3, RUN) == gated.m1
    # The evaluation's baseline is the checkpoint iteration 2 started from (what storage holds is reused).
    evaluated = evaluate_flow(config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"at_end_of_iteration": False})}), 2)
    assert (evaluated.models.model_x, evaluated.models.model_y) == (second.model, gated.m1)
    assert [result.status for result in evaluated.checks.results if result.check == "lc_win_rate"] == ["fail"]


def test_a_resumed_run_starts_from_the_promoted_base_and_stops_after_too_many_rejections(gated):
    from flows.run import run_flow

    config = gated_config(gated.root, gated.model_dir, max_iterations=3, checks={"max_consecutive_rejections": 1})
    outcome = run_flow(config)
    assert outcome.iterations == [] and outcome.resumed_after == 2
    assert "not promoted" in outcome.stopped and "max_consecutive_rejections 1" in outcome.stopped
    assert outcome.model == gated.m1
    assert not gated.store.exists(gated.store.iteration_uri(RUN, 3))
