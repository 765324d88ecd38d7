"""Benchmark: one demo iteration through Prefect, where its time goes, and what a cached re-run costs.

Runs iteration 1 of a config (default `configs/demo.yaml`) into a fresh temporary storage root
through a real Prefect API (the test harness; its start-up is not timed), then runs the same
iteration again (every stage cached). Prints:

- the first run's wall time, split by stage (each task run's run time as Prefect recorded it);
- model time: the shards' work seconds of generate, judge and meta-judge (engine load included,
  from the artifacts' manifests) plus the train stage's run time (DPO, loading and saving the model);
- orchestration overhead = wall - model time: Prefect's flow and task bookkeeping, cache lookups and
  records, UI artifacts, reading and writing tables, the non-model stages. Target: <= 10%;
- the cached re-run's wall time as a fraction of the first. Target: <= 5%;
- the peak resident memory of this process (models, DPO, tables; the Prefect server subprocess
  is not included). Target: <= 6 GB.

Run: `.venv/bin/python bench/pipeline.py [--config configs/demo.yaml]`.
The seed model is converted before timing starts (once per machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

OVERHEAD_TARGET = 0.10
CACHED_TARGET = 0.05
MEMORY_TARGET_GB = 6.0
SHARDED = ("generate", "judge", "meta_judge")
# The artifact whose manifest holds each sharded stage's work seconds.
SHARDED_ARTIFACT = {"generate": "responses", "judge": "judgments", "meta_judge": "meta_judgments"}


def _task_seconds(flow_run_id) -> dict[str, float]:
    """Run time of each task run of a flow run, by task name (`judge-iter-1` -> `judge`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    seconds = {}
    for run in runs:
        stage = run.name.rsplit("-iter-", 1)[0].replace("-", "_")
        seconds[stage] = run.total_run_time.total_seconds()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.iteration import iteration_flow
    from metareward.checkpoints import resolve_model
    from metareward.config import load_config
    from metareward.contract import STAGES
    from metareward.engines import release_engines
    from metareward.storage import StorageConfig, Store, read_manifest

    config = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="metareward-bench-") as root:
        config = config.model_copy(update={"storage": StorageConfig(root=root)})
        store = Store(config.storage)
        seed = resolve_model(config.model)
        with prefect_test_harness(server_startup_timeout=120):
            release_engines()
            started = time.perf_counter()
            first = iteration_flow(config, 1, seed, return_state=True)
            first_wall = time.perf_counter() - started
            outcome = first.result()
            stage_seconds = _task_seconds(first.state_details.flow_run_id)

            release_engines()
            started = time.perf_counter()
            second = iteration_flow(config, 1, seed, return_state=True)
            cached_wall = time.perf_counter() - started
            cached_states = second.result().states

        engine_seconds = 0.0
        for stage in SHARDED:
            if stage in outcome.stages:
                manifest = read_manifest(store, store.stage_uri(config.name, 1, SHARDED_ARTIFACT[stage]))
                engine_seconds += float(manifest["timings"]["work_seconds"])
        train_seconds = stage_seconds.get("train", 0.0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    overhead = first_wall - engine_seconds - train_seconds
    print(f"config {args.config}: iteration 1 of run {config.name!r} on {os.cpu_count()} cores")
    print(f"first run: {first_wall:.1f} s wall")
    for stage in sorted(stage_seconds, key=lambda name: list(STAGES).index(name)):
        seconds = stage_seconds[stage]
        print(f"  {stage:<15} {seconds:8.1f} s  {100 * seconds / first_wall:5.1f}%")
    print(f"  model time: engine (shard work) {engine_seconds:.1f} s + train stage {train_seconds:.1f} s")
    ratio = overhead / first_wall
    print(f"orchestration overhead: {overhead:.1f} s = {100 * ratio:.1f}% of wall (target <= {100 * OVERHEAD_TARGET:.0f}%)"
          f" {'OK' if ratio <= OVERHEAD_TARGET else 'MISSED'}")
    cached_ratio = cached_wall / first_wall
    all_cached = set(cached_states.values()) == {"Cached"}
    print(f"cached re-run: {cached_wall:.1f} s = {100 * cached_ratio:.2f}% of the first (target <= {100 * CACHED_TARGET:.0f}%)"
          f" {'OK' if cached_ratio <= CACHED_TARGET else 'MISSED'}; every stage Cached: {all_cached}")
    print(f"peak memory of this process: {peak_gb:.2f} GB (target <= {MEMORY_TARGET_GB:.0f} GB)"
          f" {'OK' if peak_gb <= MEMORY_TARGET_GB else 'MISSED'}")


if __name__ == "__main__":
    main()
