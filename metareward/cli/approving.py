"""The command that answers a waiting gate: `approve`.

    metareward approve RUN --iteration I --gate G [--reject] [--reason TEXT] [--by NAME]

A gate whose checks failed under `checks.{gate}.policy: approve` pauses the iteration's flow run
(`{RUN}-iter-{I}`, Paused with the pause key `metareward.gates.pause_key(RUN, I, G)`) until a
person answers it: in the Prefect UI (the flow run's Resume form) or with this command, which
finds that flow run through the Prefect API and resumes it with a `GateDecision`. It needs the
Prefect server the run reports to (`PREFECT_API_URL`, or the active Prefect profile's URL):
without one it stops at once, before Prefect starts a client (the temporary API that `metareward
run` starts when none is set is another server, and nobody waits there).
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import time
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from metareward.cli.application import app, configured_api_url, console, print_error

# `metareward.checks.GATES`, spelled out so that `metareward --help` does not import pandas
# (tests/test_gate_approve.py checks that the two agree).
GATE_NAMES = ("pre_train", "post_evaluation")
GateName = Enum("GateName", {gate: gate for gate in GATE_NAMES}, type=str)  # typer's choice of --gate
# The flow saves its form's schema just after it pauses: a resume in between is refused with this
# reason, and is tried again for a few seconds.
_SCHEMA_NOT_SAVED = "schema not found"
_SCHEMA_WAIT_S = 15.0


def _fail(message: str, code: int = 2) -> None:
    print_error(message)
    raise typer.Exit(code)


def _default_by() -> str:
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except Exception:  # no USER and no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _run_name(run_or_config: str) -> str:
    path = Path(run_or_config)
    if path.suffix in (".yaml", ".yml"):
        from metareward.cli.application import _load

        return _load(path).name
    return run_or_config


def _expired(state) -> bool:
    deadline = state.state_details.pause_timeout
    if deadline is None:
        return False
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=timezone.utc)
    return deadline <= datetime.now(timezone.utc)


def _paused_runs(client, name_like: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=name_like),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
        ),
        sort=FlowRunSort.START_TIME_DESC,
        limit=200,
    )


def _waiting_gates(client, run: str) -> list[tuple[int, str, object]]:
    """(iteration, gate, flow run) of every gate of `run` that waits now (paused, within its timeout)."""
    from metareward.gates import pause_key

    pattern = re.compile(rf"{re.escape(run)}-iter-(\d+)")
    waiting = []
    for flow_run in _paused_runs(client, f"{run}-iter-"):
        match = pattern.fullmatch(flow_run.name)
        if match is None or flow_run.state is None or _expired(flow_run.state):
            continue
        iteration = int(match.group(1))
        for gate in GATE_NAMES:
            if flow_run.state.state_details.pause_key == pause_key(run, iteration, gate):
                waiting.append((iteration, gate, flow_run))
    return sorted(waiting, key=lambda item: (item[0], GATE_NAMES.index(item[1])))


def _resume(flow_run_id, run_input: dict) -> None:
    """`prefect.flow_runs.resume_flow_run`, tried again while the flow has not saved its form yet."""
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + _SCHEMA_WAIT_S
    while True:
        try:
            resume_flow_run(flow_run_id, run_input=run_input)
            return
        except RuntimeError as error:
            if _SCHEMA_NOT_SAVED not in str(error).lower() or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@app.command()
def approve(
    run_or_config: Annotated[str, typer.Argument(metavar="RUN", help="The run's name (or its config file).")],
    iteration: Annotated[int, typer.Option(help="The iteration whose gate waits.", min=1)],
    gate_name: Annotated[GateName, typer.Option("--gate", help="The gate that waits.")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approving: the run stops at the gate.")] = False,
    reason: Annotated[str, typer.Option(help="Why: kept with the decision in the run's store.")] = "",
    by: Annotated[Optional[str], typer.Option(help="Who decides (default: $USER@hostname).")] = None,
) -> None:
    """Approve (or --reject) a gate that waits for a person: resumes its paused flow run via the Prefect API.

    Needs the run's Prefect server (PREFECT_API_URL, or the profile's api.url). The UI's Resume form does the same.
    """
    api_url = configured_api_url()
    if not api_url:
        _fail(
            "metareward approve needs a Prefect server: set PREFECT_API_URL (or a Prefect profile's api.url) to the "
            "server the run reports to, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api. Without one Prefect would "
            "start a temporary API of its own, where no gate waits."
        )
    gate = gate_name.value
    run = _run_name(run_or_config)
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import FlowPauseTimeout, NotPausedError

    from metareward.gates import GateDecision, pause_key

    decision = GateDecision(approve=not reject, reason=reason, by=by or _default_by())
    key = pause_key(run, iteration, gate)
    name = f"{run}-iter-{iteration}"
    where = f"gate {gate} of run {run} iteration {iteration}"
    try:
        with get_client(sync_client=True) as client:
            candidates = [
                flow_run
                for flow_run in _paused_runs(client, name)
                if flow_run.name == name and flow_run.state is not None and flow_run.state.state_details.pause_key == key
            ]
            live = [flow_run for flow_run in candidates if not _expired(flow_run.state)]
            if not live:
                waiting = _waiting_gates(client, run)
                others = (
                    "waiting gates of run " + run + ": " + ", ".join(f"iteration {i} {g} (flow run {f.name})" for i, g, f in waiting)
                    if waiting
                    else f"no gate of run {run} is waiting"
                )
                expired = f" (flow run {candidates[0].name} paused there, but its wait ran out)" if candidates else ""
                _fail(f"no waiting {where} at {api_url}{expired}; {others}")
            flow_run = live[0]  # the newest, should a dead process have left an older one paused
            _resume(flow_run.id, decision.model_dump())
    except typer.Exit:
        raise
    except httpx.HTTPError as error:  # PrefectHTTPStatusError included
        _fail(f"cannot reach the Prefect API at {api_url}: {error}", 1)
    except NotPausedError:
        _fail(f"{where}: its flow run is no longer paused (answered meanwhile, or cancelled); nothing done", 1)
    except FlowPauseTimeout:
        _fail(f"{where}: its wait ran out before the answer came; the run stops at the gate", 1)
    except RuntimeError as error:
        _fail(f"{where}: the Prefect API refused the answer: {error}", 1)
    verb = "approved" if decision.approve else "rejected"
    console.print(
        f"{verb} {where} (flow run {flow_run.name}, {flow_run.id}) by {decision.by}"
        + (f": {decision.reason}" if decision.reason else "")
        + "; the flow run resumes",
        markup=False, soft_wrap=True,
    )
