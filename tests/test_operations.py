"""Operations on a real Prefect server: deployments, the nightly schedule, retries the UI shows,
cancellation, the failure automation and the UI itself in a real browser.

One `prefect server start` on 127.0.0.1 (`tests/fixtures/prefect_server.py`) and one
`deployments/serve.py` process serve every test here, and one tiny real run (`ops`: 2 prompts,
K=2, N=2, 8 tokens, forced verdicts, one DPO step, storage on the rclone S3 server) goes through
iteration 1 (manual deployment), 2 and 3 (nightly deployment, the first of them through an S3
outage) and then a nightly that finds the run finished. The tests run in file order and build on
each other's runs (CI time is finite).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from flows.concurrency import run_slot_name
from metareward.config import RunConfig, load_config
from metareward.storage import Store, is_complete, read_manifest
from tests.fixtures.prefect_server import PREFECT

pytestmark = [pytest.mark.e2e, pytest.mark.model]

REPO = Path(__file__).resolve().parents[1]
RUN = "ops"
ITERATION = "metareward-run/meta-rewarding-iteration"
NIGHTLY = "metareward-run/meta-rewarding-nightly"
EVALUATE = "metareward-evaluate/evaluate"
TIMEZONE = "Europe/Berlin"
RUN_TIMEOUT_S = 900
# The README's screenshots (docs/prefect-ui-*.png) are refreshed by a run with
# METAREWARD_SCREENSHOT_DIR=docs; otherwise they go to the test's temporary folder.
SCREENSHOT_NAMES = ("prefect-ui-flow-run.png", "prefect-ui-artifacts.png")
STAGES = ["sample-prompts", "generate", "judge", "actor-pairs", "pre-train-checks", "train", "summary"]
GENERATION_STAGES = ["generate", "judge"]


def tiny_config(storage, model_dir: Path, name: str = RUN, **changes) -> RunConfig:
    data = {
        "name": name,
        "seed": 0,
        "max_iterations": 3,
        "model": str(model_dir),
        "storage": storage.model_dump(mode="json"),
        "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 8},
        "prompts": {"source": "embedded", "per_iteration": 2},
        "actor": {"k": 2, "max_tokens": 8},
        "judge": {"n": 2, "max_tokens": 8},
        "verdict_mode": "forced",
        "pairs": {"rho": 0.0, "train_judge_pairs": False},
        "training": {"max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 512},
        "shard_size": 1,
    }
    data.update(changes)
    return RunConfig.model_validate(data)


def _cli(server, *args: str, **env: str) -> str:
    result = subprocess.run([PREFECT, *args], env=server.env(**env), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def trigger(server, deployment: str, parameters: dict) -> str:
    """`prefect deployment run` with JSON parameters; the new flow run's id."""
    output = _cli(server, "deployment", "run", deployment, "--params", json.dumps(parameters))
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def wait_final(client, flow_run_id: str, timeout: float = RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        assert time.monotonic() < deadline, f"flow run {flow_run_id} not final after {timeout} s: {flow_run.state}"
        time.sleep(1.0)


def task_runs(client, flow_run_id: str) -> dict:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def subflow_run(client, parent_id: str, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    runs = [run for run in runs if run.parent_task_run_id is not None]
    assert runs, f"no subflow run {name}"
    return max(runs, key=lambda run: run.created)


def wait_for_log(client, flow_run_id: str, text: str, timeout_s: float = 60) -> bool:
    """Whether `text` reaches the flow run's logs within `timeout_s`: the flow run process ships its
    logs in the background, and the last of them may land after the run's final state."""
    deadline = time.monotonic() + timeout_s
    while text not in logs(client, flow_run_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def logs(client, flow_run_id: str) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return "\n".join(log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def _sigint_as_in_a_terminal() -> None:
    # A test run started in the background by a shell without job control (`pytest ... &`) ignores
    # SIGINT, and Python keeps an inherited "ignore": serve.py would then not see the teardown's
    # Ctrl-C at all (30 s, then SIGKILL, and no pausing of the schedules).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def ops(prefect_server, rclone_s3, seed_ref, seed_dir, tmp_path_factory):
    """The served deployments (deployments/serve.py) for the tiny run, and a client for the server."""
    from prefect.client.orchestration import get_client

    folder = tmp_path_factory.mktemp("ops")
    config = tiny_config(rclone_s3.storage_config(prefix="ops"), seed_dir)
    config_path = folder / "ops.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    log_path = folder / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "deployments/serve.py", "--config", str(config_path), "--timezone", TIMEZONE],
            # A triggered run starts within a second, not Prefect's default 10 s poll: six runs are triggered here.
            cwd=REPO, env=prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="1"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal,
        )
    with prefect_server.settings(), get_client(sync_client=True) as client:
        try:
            deadline = time.monotonic() + 180
            while True:
                assert serve.poll() is None, log_path.read_text()[-3000:]
                try:
                    for name in (ITERATION, NIGHTLY, EVALUATE):
                        client.read_deployment_by_name(name)
                    break
                except Exception:
                    assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                    time.sleep(1.0)
            yield SimpleNamespace(
                server=prefect_server, client=client, config=config, store=Store(config.storage), serve=serve,
                folder=folder, s3=rclone_s3, seed_dir=seed_dir, runs={},
            )
        finally:
            os.killpg(serve.pid, signal.SIGINT)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()


def test_served_nightly_deployment_has_its_cron_schedule_and_the_config_form(ops):
    nightly = ops.client.read_deployment_by_name(NIGHTLY)
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == TIMEZONE and schedule.active
    assert nightly.parameters["if_busy"] == "skip" and nightly.parameters["max_new_iterations"] == 1
    assert RunConfig.model_validate(nightly.parameters["config"]) == ops.config
    schema = nightly.parameter_openapi_schema
    assert schema["properties"]["config"]["$ref"].endswith("/RunConfig")
    run_config = schema["definitions"]["RunConfig"]
    assert {"name", "max_iterations", "engine", "training"} <= set(run_config["properties"])
    assert run_config["properties"]["max_iterations"]["default"] == 4  # the form shows the defaults
    assert "start_iteration" in schema["properties"]  # re-running iteration I from the UI
    iteration = ops.client.read_deployment_by_name(ITERATION)
    assert iteration.schedules == [] and iteration.parameters["max_new_iterations"] == 1
    evaluate = ops.client.read_deployment_by_name(EVALUATE)
    assert evaluate.parameter_openapi_schema["properties"]["config"]["$ref"].endswith("/RunConfig")


def test_the_iteration_deployment_runs_one_iteration_and_its_artifacts_are_in_the_api(ops):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    flow_run_id = trigger(ops.server, ITERATION, {"config": ops.config.model_dump(mode="json")})
    flow_run = wait_final(ops.client, flow_run_id)
    assert flow_run.state.is_completed(), logs(ops.client, flow_run_id)
    iteration_run = subflow_run(ops.client, flow_run_id, f"{RUN}-iter-1")
    generation_run = subflow_run(ops.client, str(iteration_run.id), f"{RUN}-iter-1-generation")
    stage_runs = {**task_runs(ops.client, str(iteration_run.id)), **task_runs(ops.client, str(generation_run.id))}
    assert {f"{stage}-iter-1" for stage in STAGES} <= set(stage_runs)
    ops.runs["iteration"] = str(iteration_run.id)

    keys = [f"{RUN}-iter-1-{stage}-{kind}" for stage in ("generate", "judge", "train") for kind in ("rows", "summary", "link")]
    artifacts = ops.client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {artifact.key for artifact in artifacts} == set(keys)
    by_key = {artifact.key: artifact for artifact in artifacts}
    rows = json.loads(by_key[f"{RUN}-iter-1-generate-rows"].data)
    assert 1 <= len(rows) <= 2 * 2  # K responses to each of the 2 prompts, duplicates removed
    assert "New checkpoint" in by_key[f"{RUN}-iter-1-train-summary"].data
    assert is_complete(ops.store, ops.store.stage_uri(RUN, 1, "summary"))


def test_nightly_continues_the_run_from_the_last_checkpoint_and_rides_out_an_s3_outage(ops):
    from metareward.runs import read_history

    # Night 1 starts while the S3 server is down: the first storage task (taking the run's writer
    # lease) fails on it, is retried with backoff (the UI shows the retry) once the server is back,
    # and the run goes on.
    ops.s3.stop()
    try:
        flow_run_id = trigger(ops.server, NIGHTLY, {})
        deadline = time.monotonic() + 300
        while not any(run.state_name == "AwaitingRetry" for run in task_runs(ops.client, flow_run_id).values()):
            assert time.monotonic() < deadline, "no task failed on the stopped S3 server"
            time.sleep(0.2)
    finally:
        ops.s3.start()
    first = wait_final(ops.client, flow_run_id)
    assert first.state.is_completed(), logs(ops.client, flow_run_id)
    [lease_task] = [run for name, run in task_runs(ops.client, flow_run_id).items() if name.startswith("take-run-lease")]
    assert lease_task.state.is_completed() and lease_task.run_count >= 2
    states = [state.name for state in ops.client.read_flow_run_states(flow_run_id)]
    assert states[-1] == "Completed"

    second = wait_final(ops.client, trigger(ops.server, NIGHTLY, {}))
    assert second.state.is_completed(), logs(ops.client, str(second.id))
    history = read_history(ops.store, RUN)
    assert [record.iteration for record in history if record.trained] == [1, 2, 3]
    for record in history[1:]:
        # iteration i's responses were written by M_{i-1}, the checkpoint the night before made
        base = read_manifest(ops.store, ops.store.stage_uri(RUN, record.iteration, "responses"))["checkpoint_sha256"]
        assert base == history[record.iteration - 2].model.sha256

    # The run is finished (max_iterations 3): the next night ends at once and says so.
    third = wait_final(ops.client, trigger(ops.server, NIGHTLY, {}))
    assert third.state.is_completed()
    assert wait_for_log(ops.client, str(third.id), "finished: iterations 1-3 of max_iterations 3 are complete; nothing to do")
    assert len(read_history(ops.store, RUN)) == 3


def test_the_ui_shows_the_iteration_stages_and_artifacts_in_a_real_browser(ops, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1200",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-default-apps", "--disable-extensions",
    ):
        options.add_argument(argument)
    folder = Path(os.environ.get("METAREWARD_SCREENSHOT_DIR") or tmp_path)
    flow_run_png, artifacts_png = (folder / name for name in SCREENSHOT_NAMES)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{ops.server.url}/runs/flow-run/{ops.runs['iteration']}")
        body = lambda: driver.find_element("tag name", "body").text  # noqa: E731
        # The page's tabs are links of the single-page app (a `?tab=` in the address is not honoured).
        # Generate and judge run in the generation subflow: the iteration shows it as a subflow run.
        own_stages = [stage for stage in STAGES if stage not in GENERATION_STAGES]
        for tab, shown, screenshot in (
            ("Task Runs", [f"{stage}-iter-1" for stage in own_stages], flow_run_png),
            ("Artifacts", [f"{RUN}-iter-1-{stage}-summary" for stage in ("sample-prompts", "actor-pairs", "train")], artifacts_png),
        ):
            tab_xpath = f"//*[normalize-space(.)='{tab}']"
            WebDriverWait(driver, 120, poll_frequency=1).until(lambda d: d.find_elements("xpath", tab_xpath))
            driver.find_elements("xpath", tab_xpath)[-1].click()
            WebDriverWait(driver, 120, poll_frequency=1).until(lambda d: all(text in body() for text in shown))
            driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert flow_run_png.stat().st_size > 10_000 and artifacts_png.stat().st_size > 10_000


def _flow_run_processes(serve: subprocess.Popen) -> list[psutil.Process]:
    """The processes that run flow runs for the serve process, with everything they started."""
    processes = []
    for child in psutil.Process(serve.pid).children(recursive=True):
        try:
            if "prefect.engine" in " ".join(child.cmdline()):
                processes += [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return processes


def test_cancelling_a_running_iteration_ends_its_processes_and_frees_its_run(ops):
    from prefect.states import Cancelling

    config = tiny_config(ops.config.storage, ops.seed_dir, name="ops-cancel", actor={"k": 2, "max_tokens": 64})
    flow_run_id = trigger(ops.server, ITERATION, {"config": config.model_dump(mode="json")})
    deadline = time.monotonic() + 300
    while True:
        generate = subflow_tasks = None
        try:
            generation_run = subflow_run(ops.client, flow_run_id, "ops-cancel-iter-1-generation")
            subflow_tasks = task_runs(ops.client, str(generation_run.id))
            generate = subflow_tasks.get("generate-iter-1")
        except AssertionError:
            pass
        if generate is not None and generate.state_name == "Running":
            break
        assert time.monotonic() < deadline, f"generate never ran: {subflow_tasks}"
        time.sleep(0.5)
    processes = _flow_run_processes(ops.serve)
    assert processes, "no flow run process"
    ops.client.set_flow_run_state(flow_run_id, Cancelling())
    cancelled = wait_final(ops.client, flow_run_id, timeout=120)
    assert cancelled.state.is_cancelled(), cancelled.state
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert alive == []
    assert ops.client.read_global_concurrency_limit_by_name(run_slot_name("ops-cancel")).active_slots == 0


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Webhook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failed_nightly_run_is_reported_by_the_automation(ops):
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    webhook = HTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    try:
        CustomWebhookNotificationBlock(
            name="ops-alerts", url=f"http://127.0.0.1:{webhook.server_port}/",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).save("ops-alerts", overwrite=True)
        subprocess.run(
            [sys.executable, "deployments/automations.py", "--notify", "custom-webhook/ops-alerts"],
            cwd=REPO, env=ops.server.env(), check=True, timeout=120,
        )
        assert Automation.read(name="metareward-flow-run-crashed").enabled

        broken = tiny_config(ops.config.storage, ops.folder / "no-such-checkpoint", name="ops-broken")
        failed = wait_final(ops.client, trigger(ops.server, NIGHTLY, {"config": broken.model_dump(mode="json")}))
        assert failed.state.is_failed()
        deadline = time.monotonic() + 120
        while not _Webhook.received:
            assert time.monotonic() < deadline, "the automation sent no notification"
            time.sleep(0.5)
        [message] = _Webhook.received
        assert "ops-broken" in message["subject"] and "Failed" in message["subject"]
        assert "no-such-checkpoint" in message["body"]
    finally:
        webhook.shutdown()


def test_prefect_yaml_deploys_the_three_deployments_to_the_gpu_process_pool(ops):
    # Last: `prefect deploy` moves the served deployments of the same names to the `gpu` pool.
    definitions = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["definitions"]
    assert RunConfig.model_validate(definitions["run_config"]) == load_config(REPO / "configs" / "demo.yaml")

    _cli(ops.server, "work-pool", "create", "gpu", "--type", "process")
    _cli(ops.server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", METAREWARD_NIGHTLY_TZ="UTC")
    deployments = {d.name: d for d in ops.client.read_deployments() if d.work_pool_name == "gpu"}
    assert set(deployments) == {"meta-rewarding-iteration", "meta-rewarding-nightly", "evaluate"}
    [schedule] = deployments["meta-rewarding-nightly"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    assert deployments["meta-rewarding-nightly"].parameters["config"]["name"] == "demo"
    assert deployments["meta-rewarding-iteration"].parameter_openapi_schema["properties"]["config"]["$ref"].endswith("/RunConfig")
    pull = deployments["meta-rewarding-iteration"].pull_steps
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $METAREWARD_CHECKOUT }}"}}]
