"""One writer per run (`metareward.lease`) on a local folder and on real S3 servers on 127.0.0.1:
conditional creates and take-overs on moto (which answers 412 PreconditionFailed), a killed holder,
renewal while a stage runs, storage outages while renewing (rclone), and the `metareward` command
refusing a second writer before Prefect starts."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from metareward.lease import (
    LEASE_FILE,
    RunLease,
    RunLeaseHeld,
    RunLeaseLost,
    check_lease,
    held_lease,
    hold_run_lease,
    lease_uri,
    read_lease,
)
from metareward.storage import StorageConfig, Store

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SHORT = {"lease_ttl_s": 2.0, "lease_renew_s": 0.5}


@pytest.fixture(params=["local", "moto"])
def storage(request, tmp_path) -> StorageConfig:
    """A fresh store with a short lease TTL: a local folder, or a fresh prefix on moto's S3 server."""
    if request.param == "local":
        return StorageConfig(root=str(tmp_path / "runs"), **SHORT)
    return request.getfixturevalue("moto_s3").storage_config(prefix=f"lease-{uuid.uuid4().hex[:10]}", **SHORT)


def _foreign_lease(store: Store, run: str, renewed_ago: float, ttl_s: float = 2.0, pid: int = 999_999, host: str = "elsewhere") -> None:
    """A lease object of another writer, renewed `renewed_ago` seconds ago."""
    def iso(seconds: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + "Z"

    now = time.time()
    body = {
        "format": "metareward.lease/1", "run": run, "token": uuid.uuid4().hex, "host": host, "pid": pid,
        "command": "metareward run other.yaml", "flow_run_id": "f-123", "flow_run_name": "other-run",
        "acquired_at": iso(now - renewed_ago - 60), "renewed_at": iso(now - renewed_ago), "ttl_s": ttl_s, "renew_s": 0.5,
    }
    store.write_bytes(json.dumps(body).encode(), lease_uri(store, run))


def test_two_writers_at_once_exactly_one_wins_and_the_other_is_told_who(storage):
    contenders = 4
    barrier = threading.Barrier(contenders)
    leases = [
        RunLease(storage, "demo", ttl_s=30, renew_s=1, flow_run_name=f"writer-{index}", command=f"writer {index}") for index in range(contenders)
    ]
    outcomes: dict[int, object] = {}

    def contend(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = leases[index].acquire()
        except Exception as error:  # noqa: BLE001 - the test looks at what each got
            outcomes[index] = error

    threads = [threading.Thread(target=contend, args=(index,)) for index in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        winners = [index for index, outcome in outcomes.items() if isinstance(outcome, RunLease)]
        refused = [outcome for outcome in outcomes.values() if isinstance(outcome, RunLeaseHeld)]
        assert len(winners) == 1 and len(refused) == contenders - 1, outcomes
        winner = leases[winners[0]]
        for error in refused:
            message = str(error)
            assert error.holder.token == winner.token
            for part in (f"host {socket.gethostname()}", f"pid {os.getpid()}", f"flow run writer-{winners[0]}", "since ", "expires "):
                assert part in message, (part, message)
        assert read_lease(Store(storage), "demo").token == winner.token
    finally:
        for lease in leases:
            lease.release()
    assert read_lease(Store(storage), "demo") is None  # the winner's release removed it


def test_a_killed_holders_lease_is_taken_over_after_its_ttl(storage, caplog):
    """A child process takes the lease and is SIGKILLed: refused until the TTL runs out, then taken over."""
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from metareward.lease import RunLease; from metareward.storage import StorageConfig; "
            "lease = RunLease(StorageConfig.model_validate_json(sys.argv[1]), 'demo').acquire(); "
            "print('held', flush=True); time.sleep(600)",
            storage.model_dump_json(),
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        killed_at = time.time()
        with pytest.raises(RunLeaseHeld, match=f"pid {holder.pid}"):
            RunLease(storage, "demo").acquire()
        time.sleep(max(0.0, read_lease(Store(storage), "demo").expires_at - time.time()) + 0.3)
        with caplog.at_level(logging.WARNING, logger="metareward.lease"):
            with RunLease(storage, "demo") as lease:
                assert lease.took_over is not None and lease.took_over.pid == holder.pid
                assert read_lease(Store(storage), "demo").token == lease.token
        assert time.time() - killed_at < 2.0 + 5.0
    finally:
        holder.kill()
        holder.wait(timeout=10)
    taken = [record.getMessage() for record in caplog.records if "took over the lease of run demo" in record.getMessage()]
    assert taken and f"left by {socket.gethostname()}/{holder.pid} (expired at " in taken[0], caplog.text


def test_a_lease_left_long_ago_is_taken_over_and_two_takers_cannot_both_win(storage):
    store = Store(storage)
    _foreign_lease(store, "demo", renewed_ago=3600)
    barrier = threading.Barrier(4)
    leases = [RunLease(storage, "demo", ttl_s=30, renew_s=1) for _ in range(4)]  # a winner's own lease must not expire meanwhile
    outcomes: list[object] = []

    def take(lease: RunLease) -> None:
        barrier.wait()
        try:
            outcomes.append(lease.acquire())
        except RunLeaseHeld as error:
            outcomes.append(error)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        winners = [outcome for outcome in outcomes if isinstance(outcome, RunLease)]
        assert len(winners) == 1, outcomes
        assert winners[0].took_over.host == "elsewhere" and winners[0].took_over.flow_run_name == "other-run"
    finally:
        for lease in leases:
            lease.release()


def test_a_live_foreign_lease_is_refused_with_its_holder_named(storage):
    store = Store(storage)
    _foreign_lease(store, "demo", renewed_ago=0.0, ttl_s=120)
    with pytest.raises(RunLeaseHeld) as refused:
        RunLease(storage, "demo").acquire()
    message = str(refused.value)
    for part in ("host elsewhere", "pid 999999", "flow run other-run (f-123)", "`metareward run other.yaml`", "since ", "expires ", LEASE_FILE):
        assert part in message, (part, message)


def test_renewal_keeps_the_lease_alive_while_a_long_stage_runs(storage):
    with RunLease(storage, "demo") as lease:
        first = read_lease(Store(storage), "demo")
        time.sleep(4.0)  # "a long stage": twice the TTL
        with pytest.raises(RunLeaseHeld):
            RunLease(storage, "demo").acquire()
        now = read_lease(Store(storage), "demo")
        assert now.token == lease.token and now.renewed_at > first.renewed_at + 2.0
        assert now.acquired_at == first.acquired_at
        lease.check()  # not lost


def test_release_deletes_only_our_lease_and_a_taken_lease_is_lost(storage, caplog):
    store = Store(storage)
    with RunLease(storage, "demo"):
        pass
    assert read_lease(store, "demo") is None

    lease = RunLease(storage, "demo").acquire()
    _foreign_lease(store, "demo", renewed_ago=0.0, ttl_s=120)  # someone else took it over (by hand)
    with caplog.at_level(logging.ERROR, logger="metareward.lease"):
        deadline = time.monotonic() + 10
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.1)
    assert lease.lost and "host elsewhere" in lease.lost_reason
    with pytest.raises(RunLeaseLost, match="stops before it writes more"):
        lease.check()
    assert "lost the writer lease of run demo" in caplog.text
    lease.release()
    assert read_lease(store, "demo").host == "elsewhere"  # not ours: left alone


def test_the_context_manager_says_so_when_the_lease_was_lost(storage):
    store = Store(storage)
    with pytest.raises(RunLeaseLost):
        with RunLease(storage, "demo") as lease:
            _foreign_lease(store, "demo", renewed_ago=0.0, ttl_s=120)
            with pytest.raises(RunLeaseLost):
                lease.renew()
    assert read_lease(store, "demo").host == "elsewhere"


def test_hold_run_lease_is_reentrant_in_one_context_and_exclusive_across_threads(tmp_path):
    storage = StorageConfig(root=str(tmp_path / "runs"), **SHORT)
    assert held_lease(storage, "demo") is None
    check_lease(storage, "demo")  # nothing held: nothing to check
    with hold_run_lease(storage, "demo") as outer:
        with hold_run_lease(storage, "demo", flow_run_id="id-1", flow_run_name="the-flow") as inner:
            assert inner is outer
            assert read_lease(Store(storage), "demo").flow_run_name == "the-flow"
        with hold_run_lease(storage, "demo", flow_run_id="id-2", flow_run_name="a-subflow"):
            assert read_lease(Store(storage), "demo").flow_run_name == "the-flow"  # the outermost flow run names the writer
        assert outer.held
        errors: list[BaseException] = []
        other = threading.Thread(target=lambda: errors.append(_try(lambda: hold_run_lease(storage, "demo").__enter__())))
        other.start()
        other.join(timeout=30)
        assert isinstance(errors[0], RunLeaseHeld)  # a thread has its own context: a second writer
        outer._lose("simulated take-over")
        with pytest.raises(RunLeaseLost):
            check_lease(storage, "demo")
        outer.lost_reason = None
    assert read_lease(Store(storage), "demo") is None


def _try(call):
    try:
        return call()
    except BaseException as error:  # noqa: BLE001
        return error


def test_bad_lease_settings_are_refused():
    with pytest.raises(ValueError, match="lease_renew_s .* must be below storage.lease_ttl_s"):
        StorageConfig(lease_ttl_s=30, lease_renew_s=30)
    with pytest.raises(ValueError):
        StorageConfig(lease_ttl_s=0)


def test_a_renewal_outage_shorter_than_the_ttl_is_ridden_out(rclone_s3, caplog):
    """rclone serve s3 ignores If-None-Match / If-Match: the lease says it is advisory there. Its
    server stopped for less than the TTL: renewals fail, then go through, and the lease stays ours."""
    storage = rclone_s3.storage_config(prefix=f"lease-{uuid.uuid4().hex[:8]}", lease_ttl_s=6.0, lease_renew_s=0.5, max_attempts=1)
    with caplog.at_level(logging.INFO, logger="metareward.lease"):
        with RunLease(storage, "demo") as lease:
            assert "ignored a conditional write (If-None-Match)" in caplog.text
            rclone_s3.stop()
            try:
                time.sleep(1.5)
            finally:
                rclone_s3.start()
            deadline = time.monotonic() + 15
            while "renewed the lease" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not lease.lost, lease.lost_reason
            assert read_lease(Store(storage), "demo").token == lease.token
    assert "could not renew the lease" in caplog.text and "renewed the lease" in caplog.text, caplog.text


def test_the_metareward_command_refuses_a_second_writer_before_prefect_starts(tmp_path):
    """The real command, in a child process, while this process holds the run's lease: exit 2, one
    message naming the holder, before the temporary Prefect API would start."""
    data = yaml.safe_load(DEMO.read_text())
    data["storage"] = {"root": str(tmp_path / "runs")}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    environment = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    with RunLease(StorageConfig(root=str(tmp_path / "runs")), data["name"], flow_run_name="first-writer", command="metareward run run.yaml"):
        result = subprocess.run(
            [sys.executable, "-m", "metareward.cli", "run", str(config)],
            cwd=REPO, env=environment, capture_output=True, text=True, timeout=120,
        )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out and "Prefect API" not in out and "temporary local API" not in out, out
    assert len(out.strip().splitlines()) == 1, out
    for part in (f"run {data['name']} already has a writer", f"host {socket.gethostname()}", f"pid {os.getpid()}",
                 "flow run first-writer", "since ", "expires "):
        assert part in out, (part, out)


def test_the_run_flow_fails_with_one_message_naming_the_holder_before_any_work(prefect_api, tmp_path):
    """Another writer holds the run: `run_flow` ends Failed with RunLeaseHeld's message (no traceback
    in the UI), raises it to its caller, and wrote nothing; `if_busy="skip"` skips instead."""
    from flows.run import run_flow
    from metareward.config import load_config

    config = load_config(DEMO).model_copy(update={"storage": StorageConfig(root=str(tmp_path / "runs"))})
    store = Store(config.storage)
    _foreign_lease(store, config.name, renewed_ago=0.0, ttl_s=120)
    state = run_flow(config, return_state=True)
    assert state.is_failed() and "already has a writer: host elsewhere, pid 999999" in state.message, state
    with pytest.raises(RunLeaseHeld, match="flow run other-run"):
        state.result()
    assert sorted(os.listdir(tmp_path / "runs" / config.name)) == [LEASE_FILE]  # refused before any work
    skipped = run_flow(config, if_busy="skip")
    assert skipped.stopped.startswith("skipped: another writer holds the run's lease (host elsewhere") and not skipped.iterations


def test_the_lease_held_before_a_flow_is_the_flows_subflows_and_tasks_lease(prefect_api, tmp_path):
    """The CLI takes the lease before Prefect starts; the flow, its subflows and its tasks find it
    (the same lease, not a second writer), and the outermost flow run is recorded in it."""
    from prefect import flow, task

    storage = StorageConfig(root=str(tmp_path / "runs"))

    @task
    def stage_like():
        check_lease(storage, "demo")
        return held_lease(storage, "demo").token

    @flow
    def inner():
        with hold_run_lease(storage, "demo", flow_run_name="inner") as lease:
            return lease.token, stage_like(), stage_like.submit().result()

    @flow(flow_run_name="outer-run")
    def outer():
        with hold_run_lease(storage, "demo", flow_run_id="id-outer", flow_run_name="outer-run") as lease:
            return lease.token, inner()

    with hold_run_lease(storage, "demo") as cli_lease:
        token, (inner_token, task_token, submitted_token) = outer()
        assert token == inner_token == task_token == submitted_token == cli_lease.token
        assert read_lease(Store(storage), "demo").flow_run_name == "outer-run"
    assert read_lease(Store(storage), "demo") is None
