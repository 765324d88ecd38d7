"""The gates of an iteration: what a failed check does (`checks.{gate}.policy`), in the flow.

    warn      record the decision, log the failed checks, go on
    stop      record it and stop the run with a message naming the failed checks
    approve   release what waiting must not hold (the engines, the GPU slots), emit
              `metareward.gate.waiting`, and pause the flow run with Prefect's blocking
              `pause_flow_run(wait_for_input=GateDecision, timeout, key)` until a person approves
              or rejects it (the UI's Resume form or `metareward approve`). Past `timeout_s` the
              run stops naming the gate; a flow run cancelled while it waits stops too.

Every failed check is a `metareward.check.failed` event on the resource `metareward.run.{name}`
(the automation in deployments/automations/gate-waiting.yaml notifies on the waiting event). The
decision is stored beside the checks it answered (`metareward.gates`); a person's answer to the
same checks is reused, so a resumed run does not ask again.
"""

from __future__ import annotations

import contextvars
import getpass
import threading
from typing import Callable

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run

from metareward.checks import CheckResult, Gate, GateConfig
from metareward.gates import GateDecision, GateRecord, pause_key, person_decision, write_gate_record
from metareward.storage import StorageConfig, Store

POLL_S = 2  # how often a waiting gate looks for an answer (and for its flow run's cancellation)


class GateStopped(RuntimeError):
    """A gate stopped the run: failed checks under `stop`, a rejection, a timeout or a cancellation."""


def describe(results: list[CheckResult]) -> str:
    """The failed checks, one phrase each: `judge_forced_share 0.98 (fail above 0.5)`."""
    return ", ".join(
        f"{result.check} {result.value:.4g} (fail {'above' if result.value > (result.fail or 0) else 'below'} {result.fail:g})"
        for result in results
        if result.status == "fail" and result.value is not None and result.fail is not None
    )


def _resource(run: str) -> dict[str, str]:
    return {"prefect.resource.id": f"metareward.run.{run}", "prefect.resource.name": run}


def _emit_failed(run: str, iteration: int, gate: Gate, failures: list[CheckResult]) -> None:
    for result in failures:
        emit_event(
            event="metareward.check.failed",
            resource=_resource(run),
            payload={
                "run": run, "iteration": iteration, "gate": gate, "check": result.check, "status": result.status,
                "value": result.value, "fail": result.fail, "message": result.message,
                "failed": [failure.check for failure in failures],
            },
        )


def _cancelled() -> bool:
    """Whether this flow run was ended from outside while it waits (cancelled in the UI or the API)."""
    context = FlowRunContext.get()
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(context.flow_run.id).state
    return state is not None and (state.is_cancelling() or state.is_final())


def wait_for_decision(key: str, timeout_s: int) -> GateDecision:
    """Pause this flow run until a person answers (the form of `GateDecision`), checking every few
    seconds whether the flow run was cancelled meanwhile: Prefect's blocking pause waits out its
    timeout in that case, so it runs on a thread (with this flow run's context) while this one
    watches. FlowPauseTimeout past the timeout; GateStopped when cancelled."""
    context = contextvars.copy_context()
    outcome: dict[str, object] = {}

    def pause() -> None:
        try:
            outcome["decision"] = context.run(
                pause_flow_run, wait_for_input=GateDecision, timeout=timeout_s, poll_interval=POLL_S, key=key
            )
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error

    waiter = threading.Thread(target=pause, name=f"gate-{key}", daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(POLL_S)
        if waiter.is_alive() and _cancelled():
            raise GateStopped(f"gate {key}: the flow run was cancelled while it waited for approval")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["decision"]  # type: ignore[return-value]


def run_gate(
    storage: StorageConfig,
    run: str,
    iteration: int,
    gate: Gate,
    results: list[CheckResult],
    checks_key: str,
    config: GateConfig,
    before_waiting: Callable[[], None] | None = None,
) -> GateRecord:
    """Apply `config`'s policy to a gate's check results and store the decision. Returns the record
    (decision passed, warned, approved or rejected); raises GateStopped for `stop`, a timeout or
    a cancellation (the record says which)."""
    logger = get_run_logger()
    store = Store(storage)
    failures = [result for result in results if result.status == "fail"]
    failed = [result.check for result in failures]
    record = GateRecord(gate=gate, iteration=iteration, checks_key=checks_key, failed=failed, policy=config.policy, decision="passed")
    where = f"{gate} gate of iteration {iteration}"
    if failures:
        _emit_failed(run, iteration, gate, failures)
    if not failures:
        logger.info("%s: every check passed or was skipped", where)
    elif config.policy == "warn":
        record = record.model_copy(update={"decision": "warned"})
        logger.warning("%s: checks failed: %s (policy warn: going on)", where, describe(failures))
    elif config.policy == "stop":
        write_gate_record(store, run, record.model_copy(update={"decision": "stopped"}))
        raise GateStopped(f"{where}: checks failed: {describe(failures)} (policy stop)")
    else:
        answered = person_decision(store, run, iteration, gate, checks_key)
        if answered is not None:
            logger.info("%s: %s by %s earlier for these checks (%s)", where, answered.decision, answered.by, answered.reason or "no reason given")
            return answered
        if before_waiting is not None:
            before_waiting()
        key = pause_key(run, iteration, gate)
        message = f"{where} waits for approval: checks failed: {describe(failures)}"
        emit_event(
            event="metareward.gate.waiting",
            resource=_resource(run),
            payload={"run": run, "iteration": iteration, "gate": gate, "failed": failed, "message": message, "key": key},
        )
        logger.warning("%s; approve or reject in the UI (Resume) or with `metareward approve %s --iteration %d --gate %s [--reject]`",
                       message, run, iteration, gate)
        try:
            decision = wait_for_decision(key, config.timeout_s)
        except FlowPauseTimeout:
            write_gate_record(store, run, record.model_copy(update={"decision": "timed_out"}))
            raise GateStopped(f"{where}: nobody approved or rejected it within {config.timeout_s} s (checks failed: {', '.join(failed)})") from None
        except GateStopped:
            write_gate_record(store, run, record.model_copy(update={"decision": "cancelled"}))
            raise
        record = record.model_copy(
            update={"decision": "approved" if decision.approve else "rejected", "by": decision.by or getpass.getuser(), "reason": decision.reason}
        )
        logger.info("%s: %s by %s (%s)", where, record.decision, record.by, record.reason or "no reason given")
    write_gate_record(store, run, record)
    return record
