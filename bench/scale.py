"""Benchmark: the generation stages on the local backend against the same run on a two-node Ray cluster.

Starts its own servers on 127.0.0.1: `rclone serve s3` (the runs' data), a `prefect server start`
(an API that both runs and the cluster's workers report to) and two Ray nodes, each declaring one
logical GPU, with token authentication (the classes of tests/fixtures). Then runs one tiny
iteration of the embedded model twice with `metareward run` in a child process, as a user does:

- `execution.backend: local` (every shard in the driver);
- `execution.backend: ray`, `address: auto`, `gpus_per_engine: 1`, `cpus_per_engine: 1` (one engine
  per node, shards as Ray tasks).

Prints, per run: each generation stage's wall seconds (from opening its artifact to finalizing it)
and work seconds (the shards' summed compute, engine loads included), from the artifact manifests;
the ray/local ratio of each; the engine loads and shards per worker (`summary["execution"]`);
and the whole `metareward run` wall time (seed publishing, prompts, one DPO step and the Ray
start-up of the driver included). No GPU is used: the nodes only declare one each, the engines run
on the CPU. On a 2-core machine the two nodes share the cores the local run has to itself, so the
ratio shows orchestration cost, not scaling.

Run: `.venv/bin/python bench/scale.py [--prompts 8 --k 2 --n 2 --max-tokens 12]`.
The seed model is converted before timing starts (once per machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests.fixtures

from tests.fixtures.prefect_server import PREFECT, PrefectServer, _stop_group  # noqa: E402
from tests.fixtures.ray_cluster import RayCluster  # noqa: E402
from tests.fixtures.s3 import RcloneS3Server, _free_port  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

METAREWARD = str(Path(sys.executable).with_name("metareward"))
SHARDED_ARTIFACT = {"generate": "responses", "judge": "judgments", "meta_judge": "meta_judgments"}
SERVER_STARTUP_TIMEOUT_S = 180
RUN_TIMEOUT_S = 1800


def _start_prefect_server(home: Path) -> tuple[PrefectServer, subprocess.Popen]:
    port = _free_port()
    server = PrefectServer(url=f"http://127.0.0.1:{port}", home=home, log=home / "server.log")
    environment = server.env()
    environment.pop("PREFECT_API_URL")
    with open(server.log, "wb") as log:
        process = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
            env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + SERVER_STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                return server, process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop_group(process)
            raise RuntimeError(f"prefect server not healthy after {SERVER_STARTUP_TIMEOUT_S} s")
        time.sleep(0.5)


def _start_s3(base: Path) -> RcloneS3Server:
    (base / "data").mkdir(parents=True)
    server = RcloneS3Server(
        data_dir=base / "data",
        log_path=base / "rclone.log",
        kind="rclone",
        endpoint_url=f"http://127.0.0.1:{_free_port()}",
        key="benchaccesskey",
        secret="benchsecret-" + uuid.uuid4().hex,
        key_env="METAREWARD_BENCH_S3_KEY_ID",
        secret_env="METAREWARD_BENCH_S3_SECRET",
    )
    server.start()
    os.environ.update(server.env())  # this process reads the runs' manifests
    server.bucket = server.new_bucket("metareward-bench")
    return server


def _config(folder: Path, args, storage, model: str, execution: dict) -> Path:
    data = {
        "name": "scale-bench",
        "seed": 0,
        "max_iterations": 1,
        "model": model,
        "storage": storage.model_dump(mode="json"),
        "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16},
        "prompts": {"source": "embedded", "per_iteration": args.prompts},
        "actor": {"k": args.k, "max_tokens": args.max_tokens},
        "judge": {"n": args.n, "max_tokens": args.max_tokens},
        "meta_judge": {"max_tokens": args.max_tokens},
        "verdict_mode": "forced",
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 512},
        "shard_size": args.shard_size,
        "execution": execution,
    }
    path = folder / f"{execution['backend']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(config: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([METAREWARD, "run", str(config)], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"metareward run {config} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-5000:]}")
    return wall


def _measure(storage, run: str) -> dict:
    """Per stage: wall and work seconds from the manifests, and the workers' counts from the summary."""
    from metareward.storage import Store, read_artifact, read_manifest

    store = Store(storage)
    summary = read_artifact(store, store.stage_uri(run, 1, "summary"))
    summaries = {row.stage: json.loads(row.summary) for row in summary.itertuples()}
    stages, workers = {}, {}
    for stage, artifact in SHARDED_ARTIFACT.items():
        timings = read_manifest(store, store.stage_uri(run, 1, artifact))["timings"]
        stages[stage] = (float(timings["wall_seconds"]), float(timings["work_seconds"]))
        for worker, counts in summaries[stage]["execution"]["workers"].items():
            totals = workers.setdefault(worker, {"shards": 0, "engine_loads": 0})
            totals["shards"] += counts["shards"]
            totals["engine_loads"] += counts["engine_loads"]
    return {"stages": stages, "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=1)
    args = parser.parse_args()

    from metareward.checkpoints import materialize, seed_model

    model = str(materialize(seed_model()))
    runs = {
        "local": {"backend": "local"},
        "ray": {"backend": "ray", "ray": {"address": "auto", "expected_gpus": 2, "gpus_per_engine": 1, "cpus_per_engine": 1}},
    }
    results, walls = {}, {}
    with tempfile.TemporaryDirectory(prefix="metareward-scale-") as temp:
        base = Path(temp)
        (base / "prefect").mkdir()
        (base / "ray").mkdir()
        s3 = _start_s3(base / "s3")
        try:
            prefect, prefect_process = _start_prefect_server(base / "prefect")
            try:
                cluster = RayCluster.launch(base / "ray", s3.env())
                try:
                    env = prefect.env(**s3.env())
                    for name, execution in runs.items():
                        storage = s3.storage_config(prefix=name)
                        run_env = cluster.driver_env(env) if name == "ray" else env
                        walls[name] = _run(_config(base, args, storage, model, execution), run_env)
                        results[name] = _measure(storage, "scale-bench")
                finally:
                    cluster.shutdown()
            finally:
                _stop_group(prefect_process)
        finally:
            s3.stop()

    print(
        f"{args.prompts} prompts, shard_size {args.shard_size}, K={args.k}, N={args.n}, {args.max_tokens} tokens;"
        f" {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end"
    )
    print("ray: two loopback nodes, one logical GPU each, gpus_per_engine 1, cpus_per_engine 1")
    print(f"{'stage':<12} {'local wall':>10} {'ray wall':>9} {'ray/local':>9}   {'local work':>10} {'ray work':>9} {'ray/local':>9}")
    for stage in SHARDED_ARTIFACT:
        (local_wall, local_work), (ray_wall, ray_work) = results["local"]["stages"][stage], results["ray"]["stages"][stage]
        print(
            f"{stage:<12} {local_wall:9.1f}s {ray_wall:8.1f}s {ray_wall / local_wall:9.2f}   "
            f"{local_work:9.1f}s {ray_work:8.1f}s {ray_work / local_work:9.2f}"
        )
    local_total = sum(wall for wall, _ in results["local"]["stages"].values())
    ray_total = sum(wall for wall, _ in results["ray"]["stages"].values())
    print(f"{'3 stages':<12} {local_total:9.1f}s {ray_total:8.1f}s {ray_total / local_total:9.2f}")
    print(f"metareward run wall: local {walls['local']:.1f} s, ray {walls['ray']:.1f} s, ray/local {walls['ray'] / walls['local']:.2f}")
    for name in runs:
        for worker, counts in sorted(results[name]["workers"].items()):
            print(f"  {name:<5} worker {worker}: {counts['shards']} shards, {counts['engine_loads']} engine load(s)")


if __name__ == "__main__":
    main()
