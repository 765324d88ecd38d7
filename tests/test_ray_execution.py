"""`execution.backend: ray` end to end: a real two-node Ray cluster on loopback (tests/fixtures/
ray_cluster.py: head + worker node, one logical GPU each, token auth), a real Prefect server, the
run's data on a real S3 server (`rclone serve s3`), the embedded model, `metareward run` as a user
runs it (a child process, `address: auto`).

One tiny iteration (8 prompts in shards of one, K=2, N=2, 12 tokens per text, 1 DPO step) runs
three times: on the local backend, on the cluster, and on the cluster with the worker node killed
(SIGKILL of its whole process group) once the judge stage has committed a shard. The generation
tables must be identical in all three; each worker process loads the engine once; no worker is
left after the subflow; the killed run completes with every shard exactly once. Set-ups that
cannot work on several machines fail at once with a message that says what to change.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from metareward.schema import JUDGMENT_A_ID, JUDGMENT_B_ID, JUDGMENT_ID, RESPONSE_ID
from metareward.storage import Store, read_artifact

pytestmark = [pytest.mark.ray, pytest.mark.model, pytest.mark.e2e]

RUN = "ray-e2e"
PROMPTS, K, N = 8, 2, 2
METAREWARD = str(Path(sys.executable).with_name("metareward"))
RUN_TIMEOUT_S = 600
TABLES = {"responses": [RESPONSE_ID], "judgments": [JUDGMENT_ID], "meta_judgments": [JUDGMENT_A_ID, JUDGMENT_B_ID]}
CLUSTER = {"backend": "ray", "ray": {"address": "auto", "expected_gpus": 2, "gpus_per_engine": 1, "cpus_per_engine": 1}}


def _config(tmp_path: Path, storage, model_dir: Path, execution: dict, name: str = RUN) -> Path:
    data = {
        "name": name,
        "seed": 0,
        "max_iterations": 1,
        "model": str(model_dir),
        "storage": storage.model_dump(mode="json"),
        "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16},
        "prompts": {"source": "embedded", "per_iteration": PROMPTS},
        "actor": {"k": K, "max_tokens": 12},
        "judge": {"n": N, "max_tokens": 12},
        "meta_judge": {"max_tokens": 12},
        "verdict_mode": "forced",
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 512},
        "shard_size": 1,
        "execution": execution,
    }
    path = tmp_path / f"{name}-{execution.get('backend', 'local')}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(config: Path, env: dict[str, str], timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([METAREWARD, "run", str(config)], env=env, capture_output=True, text=True, timeout=timeout_s)


def _tables(store: Store) -> dict[str, pd.DataFrame]:
    return {
        name: read_artifact(store, store.stage_uri(RUN, 1, name)).sort_values(keys).reset_index(drop=True)
        for name, keys in TABLES.items()
    }


def _stage_summaries(store: Store) -> dict[str, dict]:
    summary = read_artifact(store, store.stage_uri(RUN, 1, "summary"))
    return {row.stage: json.loads(row.summary) for row in summary.itertuples()}


@pytest.fixture(scope="module")
def driver_env(prefect_server, rclone_s3, ray_cluster):
    """A driver on the cluster: the Prefect server, the S3 credentials, the cluster's token."""
    return ray_cluster.driver_env(prefect_server.env(**rclone_s3.env()))


@pytest.fixture(scope="module")
def local_run(prefect_server, rclone_s3, seed_dir, tmp_path_factory):
    storage = rclone_s3.storage_config(prefix="ray-local")
    # Ray gives each worker OMP_NUM_THREADS = its CPUs (1): the same thread count here gives the
    # same floating-point sums, hence the same sampled tokens.
    env = prefect_server.env(**rclone_s3.env(), OMP_NUM_THREADS="1")
    started = time.perf_counter()
    result = _run(_config(tmp_path_factory.mktemp("local"), storage, seed_dir, {"backend": "local"}), env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return Store(storage), time.perf_counter() - started


@pytest.fixture(scope="module")
def ray_run(driver_env, rclone_s3, seed_dir, tmp_path_factory):
    storage = rclone_s3.storage_config(prefix="ray-cluster")
    started = time.perf_counter()
    result = _run(_config(tmp_path_factory.mktemp("ray"), storage, seed_dir, CLUSTER), driver_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return Store(storage), time.perf_counter() - started


def test_cluster_run_gives_the_local_tables_with_one_engine_load_per_worker(local_run, ray_run):
    local_store, ray_store = local_run[0], ray_run[0]
    local_tables, ray_tables = _tables(local_store), _tables(ray_store)
    for name in TABLES:
        assert len(ray_tables[name]) > 0, name
        pd.testing.assert_frame_equal(ray_tables[name], local_tables[name], obj=name)

    summaries = _stage_summaries(ray_store)
    loads: dict[str, int] = {}
    shards: dict[str, int] = {}
    for stage in ("generate", "judge", "meta_judge"):
        assert summaries[stage]["shards"] == PROMPTS and summaries[stage]["shards_computed"] == PROMPTS, stage
        for worker, counts in summaries[stage]["execution"]["workers"].items():
            loads[worker] = loads.get(worker, 0) + counts["engine_loads"]
            shards[worker] = shards.get(worker, 0) + counts["shards"]
    # one worker per logical GPU, each loading the model once for all 24 shards of three stages
    assert len(loads) == 2 and set(loads.values()) == {1}, loads
    assert sum(shards.values()) == 3 * PROMPTS
    # the subflow's workers are gone (the flow also checked it before training started)
    assert not [worker for worker in loads if psutil.pid_exists(int(worker.rsplit(":", 1)[1]))]
    # the local backend ran every shard in its own process, which loaded the model once
    local_workers = _stage_summaries(local_store)["generate"]["execution"]["workers"]
    assert len(local_workers) == 1


def test_killing_the_worker_node_mid_stage_loses_no_shard(ray_run, ray_cluster, driver_env, rclone_s3, seed_dir, tmp_path):
    storage = rclone_s3.storage_config(prefix="ray-killed")
    store = Store(storage)
    shards_folder = store.join(store.stage_uri(RUN, 1, "judgments"), "shards")
    process = subprocess.Popen(
        [METAREWARD, "run", str(_config(tmp_path, storage, seed_dir, CLUSTER))],
        env=driver_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (store.exists(shards_folder) and any("shard-" in path for path in store.ls(shards_folder))):
            assert process.poll() is None, process.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "the judge stage never committed a shard"
            time.sleep(0.2)
        ray_cluster.kill_worker()
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
        assert process.returncode == 0, output[-6000:]
    finally:
        if process.poll() is None:
            process.kill()
        if "worker" not in ray_cluster.nodes:
            ray_cluster.start_worker()

    # every shard exactly once (finalize refuses a key twice), and the texts of the uninterrupted run
    killed, uninterrupted = _tables(store), _tables(ray_run[0])
    for name in TABLES:
        pd.testing.assert_frame_equal(killed[name], uninterrupted[name], obj=name)
    assert (killed["judgments"].groupby(RESPONSE_ID).size() == N).all()


def test_nodes_listen_on_loopback_only_and_refuse_a_driver_without_the_token(ray_cluster):
    assert ray_cluster.listening_addresses() <= {"127.0.0.1", "::ffff:127.0.0.1"}, ray_cluster.listening_addresses()
    probe = "import ray\nray.init(address='auto')\n"
    intruder = dict(ray_cluster.driver_env(), RAY_AUTH_TOKEN="0" * 32)
    result = subprocess.run([sys.executable, "-c", probe], env=intruder, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


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
    result = _run(_config(tmp_path, storage, seed_dir, execution), env, timeout_s=180)
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
    # the driver started no Ray of its own (ray.init says so when it does)
    assert "Started a local Ray instance" not in result.stdout + result.stderr
