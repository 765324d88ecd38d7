"""The execution settings and the pre-flight checks of a Ray run (pure logic, no cluster)."""

from __future__ import annotations

import pytest

from metareward.contract import STAGES, settings_of
from metareward.config import ConfigError, parse_config
from metareward.execution import (
    ExecutionError,
    RayExecutionConfig,
    check_auto_finds_a_cluster,
    check_cluster_gpus,
    check_ray_execution,
    engine_slots,
    ray_init_kwargs,
    shard_size_advice,
)


def test_the_local_backend_is_the_default_and_never_part_of_a_stage_key():
    config = parse_config({"name": "x"})
    assert config.execution.backend == "local"
    ray_config = parse_config({"name": "x", "execution": {"backend": "ray", "ray": {"address": "auto", "expected_gpus": 8}}})
    for stage in ("generate", "judge", "meta_judge", "train"):
        declared = STAGES[stage].settings
        assert settings_of(declared, config.for_iteration(1)) == settings_of(declared, ray_config.for_iteration(1))


@pytest.mark.parametrize("address", ["local", "auto", "10.0.0.5:6379", "head-0.ray.svc:6379"])
def test_addresses_accepted(address):
    assert RayExecutionConfig(address=address).address == address


@pytest.mark.parametrize("address", ["http://head:6379", "head", "ray://head:10001", ""])
def test_other_addresses_are_refused_by_name(address):
    with pytest.raises(ConfigError, match="execution.ray.address"):
        parse_config({"name": "x", "execution": {"backend": "ray", "ray": {"address": address}}})


def test_unknown_execution_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown key 'execution.ray.gpus'"):
        parse_config({"name": "x", "execution": {"ray": {"gpus": 2}}})


def test_auto_is_passed_to_ray_init_so_no_local_ray_is_started_instead():
    assert ray_init_kwargs(RayExecutionConfig(address="auto"))["address"] == "auto"
    assert "address" not in ray_init_kwargs(RayExecutionConfig(address="local"))


def test_a_cluster_needs_object_storage_a_prefect_server_and_a_gpu_count():
    cluster = RayExecutionConfig(address="auto", expected_gpus=2)
    with pytest.raises(ExecutionError, match="storage.root to object storage"):
        check_ray_execution(cluster, "./runs", "file", "http://prefect:4200/api")
    with pytest.raises(ExecutionError, match="PREFECT_API_URL"):
        check_ray_execution(cluster, "s3://bucket/runs", "s3", None)
    with pytest.raises(ExecutionError, match="expected_gpus"):
        check_ray_execution(RayExecutionConfig(address="auto"), "s3://bucket/runs", "s3", "http://prefect:4200/api")
    check_ray_execution(cluster, "s3://bucket/runs", "s3", "http://prefect:4200/api")
    # one machine: its own folder and the temporary API are fine
    check_ray_execution(RayExecutionConfig(address="local"), "./runs", "file", None)


def test_auto_takes_the_cluster_ray_finds_and_fails_without_one(monkeypatch: pytest.MonkeyPatch):
    import ray._private.services as services

    auto = RayExecutionConfig(address="auto", expected_gpus=1)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a driver on a cluster node: nothing is contacted
    check_auto_finds_a_cluster(auto)
    # no RAY_ADDRESS, no address recorded by `ray start`, no GCS process: what a machine without Ray has
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())
    with pytest.raises(ExecutionError, match="'auto' but no running Ray cluster was found.*HOST:PORT"):
        check_auto_finds_a_cluster(auto)
    check_auto_finds_a_cluster(RayExecutionConfig(address="10.0.0.5:6379", expected_gpus=1))
    check_auto_finds_a_cluster(RayExecutionConfig(address="local"))


def test_cluster_gpus_below_the_expected_count_are_refused():
    with pytest.raises(ExecutionError, match="has 7 GPUs, execution.ray.expected_gpus is 8"):
        check_cluster_gpus(RayExecutionConfig(address="auto", expected_gpus=8), 7.0)
    check_cluster_gpus(RayExecutionConfig(address="auto", expected_gpus=8), 8.0)


def test_engines_and_shard_advice():
    settings = RayExecutionConfig(gpus_per_engine=2)
    assert engine_slots(settings, cluster_gpus=8, cluster_cpus=64) == 4
    assert engine_slots(RayExecutionConfig(gpus_per_engine=0, cpus_per_engine=4), 0, 16) == 4
    advice = shard_size_advice(RayExecutionConfig(), prompts=5000, shard_size=250, engines=8)
    assert advice is not None and "20 shards" in advice and "shard_size: 78" in advice
    assert shard_size_advice(RayExecutionConfig(), prompts=5000, shard_size=78, engines=8) is None


def test_a_ray_run_without_the_extra_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch):
    import sys

    from flows.generation import check_execution

    config = parse_config({"name": "x", "execution": {"backend": "ray"}})
    for module in ("prefect_ray", "ray"):  # what `import` does where the extra is not installed
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)
            with pytest.raises(ExecutionError, match=rf"backend is 'ray' but {module} is not installed.*metareward\[ray\]"):
                check_execution(config)
    check_execution(parse_config({"name": "x"}))  # local: nothing to check
