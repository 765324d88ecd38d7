"""`execution.backend: ray` end to end: a real two-node Ray cluster on loopback (tests/fixtures/
ray_cluster.py: head + worker node, one logical GPU each, token auth), a real Prefect server, the
data on a real S3 server (`rclone serve s3`), the embedded model.

One tiny iteration (8 prompts in shards of one, K=1, N=2, 8 tokens per text) runs its generation
stages (tests/fixtures/generation_driver.py: prompts, then the production generation subflow)
twice, each in a child process as a user's driver: on the local backend, and on the cluster with
`address: auto`, where the worker node is killed (SIGKILL of its whole process group) while it
computes a judge shard, after that stage has committed one, and a new node is started. The tables
must be identical, every shard there exactly once; each worker process loads the engine once; no
worker is left after the subflow. Set-ups that cannot work on several machines make `metareward
run` fail at once with a message that says what to change.

CI time: the local run computes with one thread (`OMP_NUM_THREADS=1`, what Ray gives a worker of
one CPU, so both compute the same sums); it starts with the module and works on one core while
the cluster starts and the refusal tests run. DPO and the report are the other tests' business.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from metareward.schema import JUDGMENT_A_ID, JUDGMENT_B_ID, JUDGMENT_ID, RESPONSE_ID
from metareward.storage import Store, read_artifact

pytestmark = [pytest.mark.ray, pytest.mark.model, pytest.mark.e2e]

RUN = "ray-e2e"
PROMPTS, K, N = 8, 1, 2
REPOSITORY = Path(__file__).resolve().parents[1]
METAREWARD = str(Path(sys.executable).with_name("metareward"))
DRIVER = [sys.executable, "-m", "tests.fixtures.generation_driver"]
RUN_TIMEOUT_S = 600
TABLES = {"responses": [RESPONSE_ID], "judgments": [JUDGMENT_ID], "meta_judgments": [JUDGMENT_A_ID, JUDGMENT_B_ID]}
STAGES = ("generate", "judge", "meta_judge")
CLUSTER = {"backend": "ray", "ray": {"address": "auto", "expected_gpus": 2, "gpus_per_engine": 1, "cpus_per_engine": 1}}


@dataclass
class Driver:
    """A generation driver (tests/fixtures/generation_driver.py) working on `config`; its output
    goes to CONFIG.log, its stage summaries to CONFIG.json."""

    config: Path
    process: subprocess.Popen

    @classmethod
    def start(cls, config: Path, env: dict[str, str]) -> "Driver":
        command = [*DRIVER, str(config), str(config.with_suffix(".json"))]
        with open(config.with_suffix(".log"), "w") as log:
            return cls(config, subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT))

    def summaries(self, timeout_s: float = RUN_TIMEOUT_S) -> dict[str, dict]:
        """The stage summaries, once the driver has exited 0 (else its log's tail in the failure)."""
        self.process.wait(timeout=timeout_s)
        assert self.process.returncode == 0, self.log_tail()
        return json.loads(self.config.with_suffix(".json").read_text())

    def log_tail(self) -> str:
        return self.config.with_suffix(".log").read_text(errors="replace")[-8000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _config(tmp_path: Path, storage, model_dir: Path, execution: dict) -> Path:
    data = {
        "name": RUN,
        "seed": 0,
        "max_iterations": 1,
        "model": str(model_dir),
        "storage": storage.model_dump(mode="json"),
        "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16},
        "prompts": {"source": "embedded", "per_iteration": PROMPTS},
        "actor": {"k": K, "max_tokens": 8},
        "judge": {"n": N, "max_tokens": 8},
        "meta_judge": {"max_tokens": 8},
        "verdict_mode": "forced",
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 512},
        "shard_size": 1,
        "execution": execution,
    }
    path = tmp_path / f"{RUN}-{execution.get('backend', 'local')}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tables(store: Store) -> dict[str, pd.DataFrame]:
    return {
        name: read_artifact(store, store.stage_uri(RUN, 1, name)).sort_values(keys).reset_index(drop=True)
        for name, keys in TABLES.items()
    }


@pytest.fixture(scope="module")
def driver_env(prefect_server, rclone_s3, ray_cluster):
    """A driver on the cluster: the Prefect server, the S3 credentials, the cluster's token."""
    return ray_cluster.driver_env(prefect_server.env(**rclone_s3.env()))


@pytest.fixture(scope="module", autouse=True)
def local_run(prefect_server, rclone_s3, seed_dir, tmp_path_factory) -> Iterator[tuple[Store, Driver]]:
    """The local backend's run, started with the module: it works on one core while the cluster
    starts and the refusal tests run on the other."""
    storage = rclone_s3.storage_config(prefix="ray-local")
    # Ray gives each worker OMP_NUM_THREADS = its CPUs (1): the same thread count here gives the
    # same floating-point sums, hence the same sampled tokens.
    env = prefect_server.env(**rclone_s3.env(), OMP_NUM_THREADS="1")
    driver = Driver.start(_config(tmp_path_factory.mktemp("local"), storage, seed_dir, {"backend": "local"}), env)
    try:
        yield Store(storage), driver
    finally:
        driver.stop()


def test_nodes_listen_on_loopback_only_and_refuse_a_driver_without_the_token(ray_cluster):
    assert ray_cluster.listening_addresses() <= {"127.0.0.1", "::ffff:127.0.0.1"}, ray_cluster.listening_addresses()
    probe = "import ray\nray.init(address='auto')\n"
    # two connection attempts, not Ray's default twenty (one a second)
    intruder = dict(ray_cluster.driver_env(), RAY_AUTH_TOKEN="0" * 32, RAY_gcs_server_port_wait_time_s="2")
    result = subprocess.run([sys.executable, "-c", probe], env=intruder, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "InvalidAuthToken" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("local_storage", "set storage.root to object storage"),
        ("ephemeral_api", "set PREFECT_API_URL"),
        ("no_gpu_count", "set execution.ray.expected_gpus"),
    ],
)
def test_a_multi_node_setup_that_cannot_work_fails_at_once(case, expected, driver_env, rclone_s3, seed_dir, tmp_path):
    storage = rclone_s3.storage_config(prefix=f"ray-refused-{case}")
    execution = json.loads(json.dumps(CLUSTER))
    env = dict(driver_env)
    if case == "local_storage":
        storage = storage.model_copy(update={"root": str(tmp_path / "runs")})
    elif case == "ephemeral_api":
        env.pop("PREFECT_API_URL")
    else:
        del execution["ray"]["expected_gpus"]
    started = time.perf_counter()
    command = [METAREWARD, "run", str(_config(tmp_path, storage, seed_dir, execution))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
    store = Store(storage)
    assert not store.exists(store.stage_uri(RUN, 1, "prompts"))  # refused before the first stage
    assert time.perf_counter() - started < 120


def test_auto_without_a_running_cluster_is_refused_instead_of_starting_one(driver_env, rclone_s3, seed_dir, tmp_path):
    """`auto` falls back to any `gcs_server` process it can see, so the driver runs in a PID namespace
    of its own (`unshare`), where the session's cluster is invisible, as on a machine without Ray."""
    storage = rclone_s3.storage_config(prefix="ray-no-cluster")
    env = {key: value for key, value in driver_env.items() if key != "RAY_ADDRESS"}
    command = ["unshare", "--pid", "--fork", "--mount-proc", METAREWARD, "run", str(_config(tmp_path, storage, seed_dir, CLUSTER))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "no running Ray cluster was found" in result.stdout + result.stderr, result.stderr[-4000:]
    # the driver started no Ray of its own (ray.init says so when it does), and no stage
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    store = Store(storage)
    assert not store.exists(store.stage_uri(RUN, 1, "prompts"))


def test_cluster_run_with_its_worker_node_killed_gives_the_local_tables(local_run, ray_cluster, driver_env, rclone_s3, seed_dir, tmp_path):
    storage = rclone_s3.storage_config(prefix="ray-cluster")
    store = Store(storage)
    judge_shards = store.join(store.stage_uri(RUN, 1, "judgments"), "shards")
    driver = Driver.start(_config(tmp_path, storage, seed_dir, CLUSTER), driver_env)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # mid-stage: a judge shard committed, and the worker node computing one
        while not (
            store.exists(judge_shards)
            and any("shard-" in path for path in store.ls(judge_shards))
            and ray_cluster.running("worker", "shard")
        ):
            assert driver.process.poll() is None, "the driver exited before the judge stage committed a shard:\n" + driver.log_tail()
            assert time.monotonic() < deadline, "the judge stage never committed a shard"
            time.sleep(0.2)
        ray_cluster.kill_worker()
        ray_cluster.start_worker()  # a node joins while the stage goes on, as a replaced machine does
        cluster = driver.summaries()
    finally:
        driver.stop()
        if "worker" not in ray_cluster.nodes:
            ray_cluster.start_worker()
    local_store, local_driver = local_run
    local = local_driver.summaries()

    # the same tables as the local backend: every shard exactly once (finalize refuses a key twice)
    local_tables, cluster_tables = _tables(local_store), _tables(store)
    for name in TABLES:
        assert len(cluster_tables[name]) > 0, name
        pd.testing.assert_frame_equal(cluster_tables[name], local_tables[name], obj=name)
    assert (cluster_tables["judgments"].groupby(RESPONSE_ID).size() == N).all()

    loads: dict[str, int] = {}
    shards: dict[str, int] = {}
    for stage in STAGES:
        assert cluster[stage]["shards"] == PROMPTS and cluster[stage]["shards_computed"] == PROMPTS, stage
        for worker, counts in cluster[stage]["execution"]["workers"].items():
            loads[worker] = loads.get(worker, 0) + counts["engine_loads"]
            shards[worker] = shards.get(worker, 0) + counts["shards"]
    pids = {int(worker.rsplit(":", 1)[1]) for worker in loads}
    # each worker process loaded the model once for all its shards of the three stages (the head
    # node's worker, the killed node's, the new node's: those that committed a shard)
    assert set(loads.values()) == {1} and len(loads) >= 2, loads
    assert sum(shards.values()) == len(STAGES) * PROMPTS
    # the subflow's workers are gone (the driver also checked it before it exited)
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    # the local backend ran every shard in the driver's own process, which loaded the model once
    assert len(local["generate"]["execution"]["workers"]) == 1
