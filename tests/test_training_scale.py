"""Training at scale with real TRL on the real embedded model: LoRA (merged checkpoint and servable
adapter), two processes under `accelerate launch` (gloo on CPU), resuming a killed training from its
first trainer checkpoint; and the pure mixing rule.

Every run is a few optimizer steps on the four hand-written pairs of tests/test_training.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metareward.checkpoints import MANIFEST_NAME, ModelRef, materialize
from metareward.engines.base import EngineConfig, Sampling
from metareward.training import (
    STATE_COMPLETE_MARKER,
    LoraSettings,
    TrainingConfig,
    accelerate_config_file,
    implicit_reward_margins,
    select_mix,
    train_dpo,
)
from tests.test_training import BAD_PAIRS, GOOD_PAIRS, TEST_CONFIG, _pairs


def _generates(model: ModelRef) -> None:
    """The checkpoint loads in the `hf` engine and answers a prompt."""
    from metareward.engines.hf import HFEngine

    engine = HFEngine(materialize(model), EngineConfig(backend="hf", device="cpu", batch_size=1))
    try:
        [[completion]] = engine.generate(
            [[{"role": "user", "content": "What is 2 + 2?"}]], Sampling(temperature=0.0, max_tokens=8, seed=0), n=1
        )
    finally:
        engine.close()
    assert completion.n_tokens > 0 and completion.text.strip()


# --- LoRA -------------------------------------------------------------------------------------


@pytest.mark.model
def test_lora_trains_merges_and_keeps_a_servable_adapter(seed_ref: ModelRef, tmp_path: Path) -> None:
    config = TEST_CONFIG.model_copy(
        update={"learning_rate": 2e-3, "lora": LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"])}
    )
    output = tmp_path / "iter-1" / "model"
    result = train_dpo(_pairs(GOOD_PAIRS), seed_ref, str(output), config)

    assert result.n_steps == 2 and result.n_pairs_used == 4
    assert result.model.sha256 != seed_ref.sha256
    assert result.adapter is not None and result.adapter.uri == str(tmp_path / "iter-1" / "adapter")
    adapter_dir = materialize(result.adapter)  # verifies the adapter's own manifest and hash
    names = {path.name for path in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", MANIFEST_NAME} <= names
    assert "training_args.bin" not in names
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]

    manifest = json.loads((materialize(result.model) / MANIFEST_NAME).read_text())
    assert manifest["source"]["adapter_sha256"] == result.adapter.sha256
    assert manifest["source"]["config"]["lora"]["r"] == 8
    # The merged checkpoint is a plain model (no adapter files) that the engine serves.
    assert not (materialize(result.model) / "adapter_config.json").exists()
    _generates(result.model)
    margins = implicit_reward_margins(result.model, seed_ref, _pairs(GOOD_PAIRS), beta=config.beta)
    assert margins.mean() > 0


# --- several processes -----------------------------------------------------------------------


@pytest.mark.model
def test_two_processes_under_accelerate_launch_train_a_checkpoint(seed_ref: ModelRef, tmp_path: Path) -> None:
    # 2 ranks x 2 pairs per step: one optimizer step over the four pairs, in a child process group.
    config = TEST_CONFIG.model_copy(
        update={"num_processes": 2, "max_steps": 1, "per_device_train_batch_size": 2, "gradient_checkpointing": False}
    )
    output = tmp_path / "iter-1" / "model"
    result = train_dpo(_pairs(GOOD_PAIRS + BAD_PAIRS), seed_ref, str(output), config)

    assert result.num_processes == 2 and result.n_steps == 1
    assert result.n_pairs_used == 4 and result.n_pairs_dropped["too_long"] == 1
    assert result.model.sha256 != seed_ref.sha256
    assert list(result.metrics["step"]) == [1]
    assert result.metrics.iloc[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # before the update: policy == reference
    manifest = json.loads((materialize(result.model) / MANIFEST_NAME).read_text())
    assert manifest["source"]["num_processes"] == 2
    margins = implicit_reward_margins(result.model, seed_ref, _pairs(GOOD_PAIRS), beta=config.beta)
    assert margins.mean() > 0


def test_cpu_accepts_only_ddp_and_configs_are_shipped() -> None:
    import torch

    for mode in ("ddp", "fsdp", "deepspeed"):
        assert accelerate_config_file(mode).is_file()
    if not torch.cuda.is_available():
        from metareward.training import launch_command

        with pytest.raises(ValueError, match="training.distributed 'fsdp' needs CUDA GPUs"):
            launch_command(Path("/tmp/job.json"), TrainingConfig(num_processes=2, distributed="fsdp"))


# --- resuming ------------------------------------------------------------------------------------


class Killed(Exception):
    """Stands for the process dying right after the first trainer checkpoint was uploaded."""


def _kill_after_first_save():
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Killed(f"killed after the trainer checkpoint of step {state.global_step}")

    return KillAfterSave()


# A training run in a child process that holds still once its first trainer checkpoint is uploaded
# (the upload callback runs before the extra ones), so the parent can SIGKILL it right there.
_TRAIN_UNTIL_KILLED = """
import json, sys, time
import pandas as pd
from transformers import TrainerCallback
from metareward.checkpoints import ModelRef
from metareward.training import TrainingConfig, train_dpo

class HoldAfterTheFirstCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        print(f"checkpoint {state.global_step} uploaded", flush=True)
        time.sleep(3600)

spec = json.loads(open(sys.argv[1]).read())
train_dpo(pd.read_json(spec["pairs"]), ModelRef(**spec["base"]), spec["output"], TrainingConfig(**spec["config"]),
          state_uri=spec["state"], callbacks=[HoldAfterTheFirstCheckpoint()])
"""


@pytest.mark.model
def test_a_training_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_weights_and_losses(
    seed_ref: ModelRef, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from metareward.training.scratch import PREFIX, remove_abandoned

    config = TEST_CONFIG.model_copy(update={"max_steps": 3, "save_steps": 1, "per_device_train_batch_size": 2})
    pairs = _pairs(GOOD_PAIRS)
    output, state = tmp_path / "iter-1" / "model", tmp_path / "iter-1" / "train_state"
    spec = tmp_path / "job.json"
    pairs.to_json(tmp_path / "pairs.json")
    spec.write_text(json.dumps({
        "pairs": str(tmp_path / "pairs.json"), "base": seed_ref.model_dump(mode="json"), "output": str(output),
        "config": config.model_dump(mode="json"), "state": str(state),
    }))
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _TRAIN_UNTIL_KILLED, str(spec)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(scratch_root)},
    )  # fmt: skip
    try:
        # (the trainer prints its logs on the same stdout)
        assert any(line.strip() == "checkpoint 1 uploaded" for line in child.stdout), "the child ended before its first checkpoint"
        child.send_signal(signal.SIGKILL)  # no clean-up runs in the child
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert (state / "checkpoint-1" / STATE_COMPLETE_MARKER).is_file() and not output.exists()
    # the killed child's scratch folder (its local trainer checkpoint) is left, and the next training sweeps it
    [abandoned] = scratch_root.glob(PREFIX + "*")
    assert (abandoned / "trainer" / "checkpoint-1" / "optimizer.pt").is_file()
    assert remove_abandoned(str(scratch_root)) == [abandoned]

    resumed = train_dpo(pairs, seed_ref, str(output), config, state_uri=str(state))
    straight = train_dpo(pairs, seed_ref, str(tmp_path / "straight" / "model"), config)
    assert resumed.resumed_from_step == 1 and resumed.n_steps == straight.n_steps == 3
    # The uninterrupted run's losses, step 1's from the restored trainer state, 2 and 3 after the resume.
    assert list(resumed.metrics["step"]) == list(straight.metrics["step"]) == [1, 2, 3]
    assert resumed.metrics["loss"].tolist() == pytest.approx(straight.metrics["loss"].tolist(), abs=1e-6)
    # ... and its weights (fp32 on the CPU).
    weights = [load_file(materialize(run.model) / "model.safetensors") for run in (resumed, straight)]
    assert weights[0].keys() == weights[1].keys()
    assert max(float((weights[0][name] - weights[1][name]).abs().max()) for name in weights[0]) <= 1e-6
    base = load_file(materialize(seed_ref) / "model.safetensors")
    assert any(not (weights[0][name] == base[name]).all() for name in base), "the resumed run trained nothing"
    assert not state.exists(), "the trainer state is removed once M_i is saved"
    manifest = json.loads((materialize(resumed.model) / MANIFEST_NAME).read_text())
    assert manifest["source"]["resumed_from_step"] == 1
    _generates(resumed.model)


@pytest.mark.model
def test_state_of_another_job_is_discarded(seed_ref: ModelRef, tmp_path: Path) -> None:
    state = tmp_path / "train_state"
    (state / "checkpoint-5").mkdir(parents=True)
    (state / "checkpoint-5" / STATE_COMPLETE_MARKER).write_text("")
    (state / "job.json").write_text(json.dumps({"fingerprint": "another job"}))
    config = TEST_CONFIG.model_copy(update={"max_steps": 1, "save_steps": 1})
    result = train_dpo(_pairs(GOOD_PAIRS), seed_ref, str(tmp_path / "model"), config, state_uri=str(state))
    assert result.resumed_from_step == 0 and result.n_steps == 1
    assert not state.exists()


# --- mixing (pure) -------------------------------------------------------------------------------

KINDS = ["actor"] * 4 + ["judge"] * 10


def test_mix_keeps_everything_by_default() -> None:
    kept, counts = select_mix(KINDS, None, None, seed=0)
    assert kept == list(range(14))
    assert counts == {"actor_available": 4, "judge_available": 10, "actor_used": 4, "judge_used": 10, "judge_left_out": 0}


def test_mix_cap_and_ratio_take_the_smaller_limit() -> None:
    kept, counts = select_mix(KINDS, 6, None, seed=0)
    assert counts["judge_used"] == 6 and counts["judge_left_out"] == 4 and len(kept) == 10
    assert kept[:4] == [0, 1, 2, 3] and kept == sorted(kept)
    _, counts = select_mix(KINDS, None, 0.5, seed=0)
    assert counts["judge_used"] == 2  # 0.5 x 4 actor pairs
    _, counts = select_mix(KINDS, 1, 0.5, seed=0)
    assert counts["judge_used"] == 1
    _, counts = select_mix(["actor"] * 10 + ["judge"] * 10, None, 0.3, seed=0)
    assert counts["judge_used"] == 3
    _, counts = select_mix(["judge"] * 3, None, 1.0, seed=0)
    assert counts == {"actor_available": 0, "judge_available": 3, "actor_used": 0, "judge_used": 0, "judge_left_out": 3}


def test_mix_choice_is_seeded() -> None:
    first, _ = select_mix(KINDS, 5, None, seed=7)
    assert select_mix(KINDS, 5, None, seed=7)[0] == first
    others = {tuple(select_mix(KINDS, 5, None, seed=seed)[0]) for seed in range(8)}
    assert len(others) > 1


def test_mix_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        select_mix(["actor", "critic"], None, None, seed=0)


def test_mixing_config_validated() -> None:
    with pytest.raises(ValueError, match="max_judge_pairs"):
        TrainingConfig(max_judge_pairs=-1)
    with pytest.raises(ValueError, match="rank"):
        TrainingConfig(lora={"rank": 8})
    with pytest.raises(ValueError, match="distributed"):
        TrainingConfig(distributed="horovod")
    assert TrainingConfig(lora={"r": 4}).lora.alpha == 16


@pytest.mark.model
def test_mixing_cap_recorded_in_the_manifest(seed_ref: ModelRef, tmp_path: Path) -> None:
    config = TEST_CONFIG.model_copy(update={"max_steps": 1, "max_judge_pairs": 1})
    result = train_dpo(_pairs(GOOD_PAIRS), seed_ref, str(tmp_path / "model"), config)
    assert result.n_pairs_used_by_kind == {"actor": 2, "judge": 1}
    assert result.mixing["judge_left_out"] == 1
    manifest = json.loads((materialize(result.model) / MANIFEST_NAME).read_text())
    assert manifest["source"]["mixing"] == result.mixing
    assert manifest["source"]["n_pairs_used"] == 3


# --- the child process group ----------------------------------------------------------------------


def test_launched_processes_die_with_their_parent(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    # A parent that starts a long child the way run_child starts `accelerate launch`, then is SIGKILLed:
    # no cleanup runs in it, and the child must still go.
    parent_code = (
        "import subprocess, sys, time\n"
        "from metareward.processes import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True, preexec_fn=die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[1]))
    child_pid = int(parent.stdout.readline())
    os.kill(child_pid, 0)  # alive while the parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"child {child_pid} outlived its killed parent")


def test_a_failing_child_reports_its_output(tmp_path: Path) -> None:
    from metareward.training import TrainJob, run_child

    config = TrainingConfig(num_processes=2)
    job = TrainJob(
        model_dir=str(tmp_path / "no-model"),
        examples_path=str(tmp_path / "no-examples.json"),
        config=config.model_dump(mode="json"),
        precision="fp32",
        work_dir=str(tmp_path / "trainer"),
        model_out=str(tmp_path / "model"),
        adapter_out=None,
        state_uri=None,
        resume_from=None,
        result_path=str(tmp_path / "result.json"),
    )
    with pytest.raises(RuntimeError, match=r"(?s)exited with \d+.*no-examples\.json"):
        run_child(job, tmp_path, config)


@pytest.mark.model
def test_resume_through_s3(seed_ref: ModelRef, rclone_s3) -> None:
    # On rclone, not moto: 1.6 GB of trainer state goes up and back, and moto's server shares this
    # process's GIL with the training (88 s against 58 s run alone).
    from metareward.storage import Store

    store = Store(rclone_s3.storage_config("resume-s3"))
    output = store.checkpoint_uri("run", 1)
    state = store.stage_uri("run", 1, "train_state")
    config = TEST_CONFIG.model_copy(update={"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 4})
    with pytest.raises(Killed):
        train_dpo(_pairs(GOOD_PAIRS), seed_ref, output, config, fs=store.fs, state_uri=state, callbacks=[_kill_after_first_save()])
    assert store.exists(store.join(state, "checkpoint-1", STATE_COMPLETE_MARKER))

    resumed = train_dpo(_pairs(GOOD_PAIRS), seed_ref, output, config, fs=store.fs, state_uri=state)
    assert resumed.resumed_from_step == 1 and resumed.n_steps == 2
    assert list(resumed.metrics["step"]) == [1, 2]
    assert resumed.model.uri.startswith("s3://")
    assert not store.exists(state)
