"""DPO under Ray Train (`training.launcher: ray_train`) on a real two-node Ray cluster on loopback
(tests/fixtures/ray_cluster.py), with the run's storage on a real S3 server (rclone); and the checks
that refuse a Ray Train run that cannot work, before anything is loaded.

The training run is the accelerate test's (tests/test_training_scale.py): one optimizer step over
the four hand-written pairs of tests/test_training.py, two workers of two pairs each, here two CPU
workers (gloo) of the cluster. It runs in a child process, a driver with the cluster's environment
(`ray_cluster.driver_env()`: the address for `auto`, the token, a loopback node IP set before
`import ray`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from metareward.checkpoints import MANIFEST_NAME, ModelRef, materialize
from metareward.execution import ExecutionError, RayExecutionConfig
from metareward.storage import Store
from metareward.training import (
    TrainingConfig,
    check_ray_train_locations,
    check_worker_resources,
    ray_train_precision,
    require_ray_train,
)
from tests.test_training import BAD_PAIRS, COLUMNS, GOOD_PAIRS, TEST_CONFIG

# The driver: trains the pairs on the cluster and prints what came back as one JSON line.
DRIVER = """
import json, sys
import pandas as pd
from metareward.checkpoints import ModelRef
from metareward.execution import RayExecutionConfig
from metareward.storage import StorageConfig, Store
from metareward.training import TrainingConfig, train_dpo

args = json.loads(sys.argv[1])
store = Store(StorageConfig.model_validate(args["storage"]))
pairs = pd.DataFrame(args["pairs"], columns=args["columns"])
result = train_dpo(
    pairs,
    ModelRef.model_validate(args["base"]),
    store.checkpoint_uri("ray-train", 1),
    TrainingConfig.model_validate(args["config"]),
    fs=store.fs,
    ray=RayExecutionConfig.model_validate(args["ray"]),
)
print(json.dumps({
    "model": result.model.model_dump(),
    "n_steps": result.n_steps,
    "n_pairs_used": result.n_pairs_used,
    "num_processes": result.num_processes,
    "precision": result.precision,
    "metrics": result.metrics.to_dict(orient="records"),
}))
"""


def _changed_tensors(before_dir: Path, after_dir: Path) -> tuple[list[str], list[str]]:
    from safetensors import safe_open

    with safe_open(str(before_dir / "model.safetensors"), "pt") as before, safe_open(
        str(after_dir / "model.safetensors"), "pt"
    ) as after:
        checked = [name for name in sorted(before.keys()) if "layers.0." in name or "embed_tokens" in name]
        changed = [name for name in checked if not before.get_tensor(name).equal(after.get_tensor(name))]
    return checked, changed


@pytest.mark.model
@pytest.mark.ray
def test_two_cpu_workers_under_ray_train_save_a_trained_checkpoint(
    seed_ref: ModelRef, seed_dir: Path, rclone_s3, ray_cluster
) -> None:
    config = TEST_CONFIG.model_copy(
        update={
            "launcher": "ray_train",
            "num_processes": 2,
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "gradient_checkpointing": False,
        }
    )
    # CPU workers (no GPU per worker) on a cluster that must show its two logical GPUs.
    ray = RayExecutionConfig(address="auto", expected_gpus=2, gpus_per_engine=0, cpus_per_engine=1)
    storage = rclone_s3.storage_config("ray-train")
    args = {
        "storage": storage.model_dump(mode="json"),
        "pairs": [list(row) for row in GOOD_PAIRS + BAD_PAIRS],
        "columns": COLUMNS,
        "base": seed_ref.model_dump(),
        "config": config.model_dump(mode="json"),
        "ray": ray.model_dump(mode="json"),
    }
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(args)],
        env=ray_cluster.driver_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-6000:]
    result = json.loads(driver.stdout.strip().splitlines()[-1])

    assert result["num_processes"] == 2, "the trainer's world size: two Ray Train workers"
    assert result["n_steps"] == 1 and result["n_pairs_used"] == 4 and result["precision"] == "fp32"
    [step] = result["metrics"]
    assert step["step"] == 1
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-3)  # measured before the update: policy == reference

    store = Store(storage)
    model = ModelRef.model_validate(result["model"])
    assert model.uri == store.checkpoint_uri("ray-train", 1) and model.sha256 != seed_ref.sha256
    model_dir = materialize(model, store.fs)  # downloads and verifies every file against the sha256
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == model.sha256
    assert manifest["source"]["num_processes"] == 2 and manifest["source"]["n_steps"] == 1
    assert manifest["source"]["config"]["launcher"] == "ray_train"
    assert manifest["source"]["base_sha256"] == seed_ref.sha256
    checked, changed = _changed_tensors(seed_dir, model_dir)
    assert len(checked) >= 5 and len(changed) >= len(checked) // 2, f"only {changed} of {checked} changed"

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
    assert reloaded.num_parameters() > 100_000_000


def test_a_cluster_refuses_local_output_folders() -> None:
    cluster = RayExecutionConfig(address="auto", expected_gpus=1)
    with pytest.raises(ExecutionError, match=r"cannot write the local folder '/runs/x/iter-1/model' \(output_uri\)"):
        check_ray_train_locations(cluster, {"output_uri": "/runs/x/iter-1/model", "state_uri": None})
    with pytest.raises(ExecutionError, match=r"\(state_uri\).*s3://bucket/prefix"):
        check_ray_train_locations(
            cluster, {"output_uri": "s3://b/x/iter-1/model", "state_uri": "file:///runs/x/iter-1/train_state"}
        )
    check_ray_train_locations(cluster, {"output_uri": "s3://b/x/iter-1/model", "adapter_uri": None})
    # Ray on this machine: every worker sees this machine's folders.
    check_ray_train_locations(RayExecutionConfig(), {"output_uri": "/runs/x/iter-1/model"})


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where the extra is not installed
    with pytest.raises(ExecutionError, match=r"launcher is 'ray_train' but ray[.a-z]* is not installed.*metareward\[ray\]"):
        require_ray_train()


def test_ray_train_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="distributed 'fsdp' is an accelerate config; launcher 'ray_train' runs DDP"):
        TrainingConfig(launcher="ray_train", num_processes=2, distributed="fsdp")
    with pytest.raises(ValueError, match="num_processes"):
        TrainingConfig(launcher="ray_train", num_processes=0)
    # Decided on the driver, which may have no GPU: by the workers' kind.
    assert ray_train_precision("auto", gpu_workers=True) == "bf16"
    assert ray_train_precision("auto", gpu_workers=False) == "fp32"
    with pytest.raises(ValueError, match="'bf16' needs GPU workers"):
        ray_train_precision("bf16", gpu_workers=False)


def test_workers_the_cluster_cannot_hold_are_refused_instead_of_awaited() -> None:
    cluster = {"CPU": 4.0, "GPU": 2.0}
    check_worker_resources(cluster, 2, {"CPU": 1.0, "GPU": 1.0})
    check_worker_resources(cluster, 4, {"CPU": 1.0})
    with pytest.raises(ExecutionError, match=r"3 Ray Train workers need 3 GPU \(1 each\) and the Ray cluster has 2.*gpus_per_engine to 0"):
        check_worker_resources(cluster, 3, {"CPU": 1.0, "GPU": 1.0})
    with pytest.raises(ExecutionError, match=r"need 6 CPU \(2 each\) and the Ray cluster has 4"):
        check_worker_resources(cluster, 3, {"CPU": 2.0})
    with pytest.raises(ExecutionError, match=r"need 1 GPU \(1 each\) and the Ray cluster has 0"):
        check_worker_resources({"CPU": 2.0}, 1, {"CPU": 1.0, "GPU": 1.0})
