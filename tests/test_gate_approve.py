"""`metareward approve` and the gate-waiting automation, through a real Prefect server.

A gate that waits is an iteration flow run paused by Prefect's blocking `pause_flow_run(
wait_for_input=GateDecision, key=pause_key(run, iteration, gate))`. Here a stand-in flow
(tests/fixtures/gate_flow.py, its own process) pauses like that on the session's `prefect server
start` (tests/fixtures/prefect_server.py); the command, another process, finds it through the API
and resumes it, and the decision the flow gets is what the command was told. The automation
`deployments/automations/gate-waiting.yaml` is created on the same server and its notification is
caught by a webhook on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from metareward.gates import pause_key

REPO = Path(__file__).resolve().parents[1]
APPROVE = [sys.executable, "-m", "metareward.cli", "approve"]
PAUSE_TIMEOUT_S = 90  # for the stand-in flow to start and pause


def _load_automations_module():
    spec = importlib.util.spec_from_file_location("deployment_automations", REPO / "deployments" / "automations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def approve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*APPROVE, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def approve_all(env: dict[str, str], *calls: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Several `metareward approve` at once (each starts Python and Prefect: seconds)."""
    processes = [subprocess.Popen([*APPROVE, *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in calls]
    results = []
    for args, process in zip(calls, processes):
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess([*APPROVE, *args], process.returncode, stdout, stderr))
    return results


def _output(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())  # one line, whatever the terminal width


def _flow_runs(server, name: str) -> list[dict]:
    response = httpx.post(f"{server.api_url}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=10)
    response.raise_for_status()
    return response.json()


@contextmanager
def waiting_gate(server, folder: Path, run: str, iteration: int, gate: str = "pre_train"):
    """The stand-in flow, paused at `gate` of `run`'s iteration; stopped on the way out if still there."""
    decision, log_path = folder / f"{run}-decision.json", folder / f"{run}-flow.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.gate_flow", run, str(iteration), gate, str(decision)],
            cwd=REPO, env=server.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    name, key = f"{run}-iter-{iteration}", pause_key(run, iteration, gate)
    try:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            paused = [
                flow_run for flow_run in _flow_runs(server, name)
                if flow_run["state"] and flow_run["state"]["type"] == "PAUSED" and flow_run["state"]["state_details"]["pause_key"] == key
            ]
            if paused:
                break
            assert time.monotonic() < deadline, f"{name} not paused after {PAUSE_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield SimpleNamespace(process=process, decision=decision, log=log_path, flow_run=paused[0])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _decision(gate) -> dict:
    """The decision the flow got, once it has ended."""
    try:
        assert gate.process.wait(timeout=60) == 0, gate.log.read_text()[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the flow did not resume:\n{gate.log.read_text()[-3000:]}")
    return json.loads(gate.decision.read_text())


def test_approve_resumes_the_paused_flow_run_with_the_decision(prefect_server, tmp_path):
    with waiting_gate(prefect_server, tmp_path, "gate-approve", 1) as gate:
        result = approve(
            prefect_server.env(), "gate-approve", "--iteration", "1", "--gate", "pre_train",
            "--reason", "forced verdicts are expected of the demo model", "--by", "alice@example.org",
        )
        assert result.returncode == 0, _output(result)
        assert "approved gate pre_train of run gate-approve iteration 1" in _output(result)
        assert _decision(gate) == {"approve": True, "reason": "forced verdicts are expected of the demo model", "by": "alice@example.org"}
    [flow_run] = _flow_runs(prefect_server, "gate-approve-iter-1")
    assert flow_run["state"]["type"] == "COMPLETED"


def test_reject_and_the_gates_that_do_not_wait(prefect_server, tmp_path):
    env = prefect_server.env(USER="bob")
    with waiting_gate(prefect_server, tmp_path, "gate-reject", 2) as gate:
        # Another iteration and another gate of the same run: nothing resumed, the waiting one named.
        elsewhere = (("1", "pre_train"), ("2", "post_evaluation"))
        results = approve_all(env, *(("gate-reject", "--iteration", iteration, "--gate", name) for iteration, name in elsewhere))
        for (iteration, name), result in zip(elsewhere, results):
            assert result.returncode == 2, _output(result)
            assert f"no waiting gate {name} of run gate-reject iteration {iteration}" in _output(result)
            assert "waiting gates of run gate-reject: iteration 2 pre_train" in _output(result)
        assert gate.process.poll() is None

        result = approve(env, "gate-reject", "--iteration", "2", "--gate", "pre_train", "--reject", "--reason", "the judge forced nearly every verdict")
        assert result.returncode == 0, _output(result)
        assert "rejected gate pre_train of run gate-reject iteration 2" in _output(result)
        # --by defaults to $USER@hostname
        assert _decision(gate) == {"approve": False, "reason": "the judge forced nearly every verdict", "by": f"bob@{socket.gethostname()}"}

    result = approve(env, "gate-reject", "--iteration", "2", "--gate", "pre_train")
    assert result.returncode == 2, _output(result)
    assert "no gate of run gate-reject is waiting" in _output(result)


def test_no_waiting_gate_names_the_run_and_a_profile_api_url_is_used(prefect_server, tmp_path):
    # No PREFECT_API_URL in the environment: the active profile's URL is the server's.
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "gates"\n\n[profiles.gates]\nPREFECT_API_URL = "{prefect_server.api_url}"\n')
    env = prefect_server.env(PREFECT_HOME=str(tmp_path), PREFECT_PROFILES_PATH=str(profiles))
    env.pop("PREFECT_API_URL")
    result = approve(env, "never-ran", "--iteration", "3", "--gate", "post_evaluation")
    assert result.returncode == 2, _output(result)
    assert f"no waiting gate post_evaluation of run never-ran iteration 3 at {prefect_server.api_url}" in _output(result)
    assert "no gate of run never-ran is waiting" in _output(result)


def test_without_a_prefect_server_approve_refuses_before_starting_prefect(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_PROFILES_PATH=str(tmp_path / "profiles.toml"))
    started = time.monotonic()
    result = approve(env, "demo", "--iteration", "1", "--gate", "pre_train")
    assert result.returncode == 2, _output(result)
    assert "metareward approve needs a Prefect server: set PREFECT_API_URL" in _output(result)
    assert time.monotonic() - started < 60
    # No temporary API was started: its database would be in PREFECT_HOME.
    assert not list((tmp_path / "home").glob("*.db"))


def test_a_run_whose_gate_would_wait_on_a_temporary_api_is_refused_before_prefect_starts(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_PROFILES_PATH=str(tmp_path / "profiles.toml"))
    config = tmp_path / "gated.yaml"
    config.write_text(f"name: gated\nprompts:\n  per_iteration: 4\nstorage:\n  root: {tmp_path / 'runs'}\nchecks:\n  pre_train:\n    policy: approve\n")
    for command in ("run", "iterate"):
        result = subprocess.run(
            [sys.executable, "-m", "metareward.cli", command, str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, _output(result)
        assert "checks.pre_train.policy is approve" in _output(result) and "no PREFECT_API_URL is set" in _output(result)
    assert not list((tmp_path / "home").glob("*.db")) and not (tmp_path / "runs").exists()


def test_an_unknown_gate_is_refused_by_its_choices(tmp_path):
    result = approve(dict(os.environ), "demo", "--iteration", "1", "--gate", "pre-train")
    assert result.returncode == 2
    assert "Invalid value for '--gate'" in _output(result)
    assert "pre_train" in _output(result) and "post_evaluation" in _output(result)


def test_the_command_knows_the_gates_of_the_checks():
    from metareward.checks import GATES
    from metareward.cli.approving import GATE_NAMES

    assert GATE_NAMES == GATES


def test_every_automation_file_is_a_valid_prefect_automation():
    from prefect.automations import Automation

    automations = _load_automations_module()
    block_id = str(uuid.uuid4())
    specs = automations.load_automations(block_id)
    names = [spec["name"] for spec in specs]
    assert len(names) == len(set(names)) and "metareward-gate-waiting" in names
    for spec in specs:
        Automation.model_validate(spec)  # triggers, actions and their templates
    [waiting] = [Automation.model_validate(spec) for spec in specs if spec["name"] == "metareward-gate-waiting"]
    assert waiting.trigger.expect == {"metareward.gate.waiting"}
    assert waiting.trigger.match.model_dump() == {"prefect.resource.id": "metareward.run.*"}
    [action] = waiting.actions
    assert action.type == "send-notification" and str(action.block_document_id) == block_id


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        _Webhook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_waiting_gate_is_notified_with_how_to_answer_it(prefect_server, tmp_path):
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    webhook = HTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    created = None
    try:
        with prefect_server.settings():
            block_id = CustomWebhookNotificationBlock(
                name="gate-alerts", url=f"http://127.0.0.1:{webhook.server_port}/", json_data={"subject": "{{subject}}", "body": "{{body}}"},
            ).save("gate-alerts", overwrite=True)
            [spec] = [spec for spec in _load_automations_module().load_automations(str(block_id)) if spec["name"] == "metareward-gate-waiting"]
            created = Automation.model_validate(spec).create()
        with waiting_gate(prefect_server, tmp_path, "gate-notify", 3, "post_evaluation") as gate:
            deadline = time.monotonic() + 60
            while not _Webhook.received:
                assert time.monotonic() < deadline, "the gate-waiting automation sent no notification"
                time.sleep(0.5)
            [message] = _Webhook.received
            subject, body = message["subject"], message["body"]
            assert subject == "metareward gate-notify: iteration 3 waits at gate post_evaluation"
            assert "Run gate-notify, iteration 3: the post_evaluation gate waits for a person." in body
            assert "Failed checks: judge_forced_share, score_inflation" in body
            assert "judge_forced_share 0.98 (fail above 0.5)" in body
            assert "the flow run gate-notify-iter-3 is Paused" in body
            # The flow run (a link where the server knows its UI's address, PREFECT_UI_URL; its id here).
            assert gate.flow_run["id"] in body
            # Answering as the notification says resumes the flow.
            [command] = [line.strip() for line in body.splitlines() if line.strip().startswith("metareward approve") and "--reject" not in line]
            assert command == 'metareward approve gate-notify --iteration 3 --gate post_evaluation --reason "..."'
            result = approve(prefect_server.env(), *shlex.split(command)[2:-1], "win rate is fine", "--by", "carol")
            assert result.returncode == 0, _output(result)
            assert _decision(gate) == {"approve": True, "reason": "win rate is fine", "by": "carol"}
    finally:
        webhook.shutdown()
        if created is not None:
            with prefect_server.settings():
                Automation.read(id=created.id).delete()
