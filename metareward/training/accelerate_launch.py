"""Several training processes on this machine: `accelerate launch` in a child process group.

Processes (`num_processes`): 1 trains in this process. More start ONE child process group,
`accelerate launch` with the shipped config `configs/accelerate/{distributed}.yaml` (resolved
from the repository checkout: the package is installed editable), each rank running
`python -m metareward.training.worker JOB` on a job spec file written by the parent. On a machine
without CUDA the ranks use `use_cpu` and the gloo backend. The main rank writes the model to a
local folder; the parent saves it with `save_checkpoint`. The group dies with the parent:
PR_SET_PDEATHSIG on the launcher and every rank, and the parent kills the group on any exception
(a cancelled flow run included) before re-raising.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

from metareward.processes import child_environment, die_with_parent, kill_group
from metareward.training.config import TrainingConfig
from metareward.training.job import TrainJob

logger = logging.getLogger(__name__)


# The shipped accelerate config files (`configs/accelerate/{mode}.yaml`), from the repository checkout.
ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def accelerate_config_file(mode: str) -> Path:
    """The shipped accelerate config for `mode` (`ddp`, `fsdp`, `deepspeed`)."""
    path = ACCELERATE_CONFIG_DIR / f"{mode}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"training.distributed {mode!r}: accelerate config {path} not found (metareward ships it in the "
            "repository's configs/accelerate/; install the package editable from a checkout)"
        )
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(job_path: Path, config: TrainingConfig) -> list[str]:
    """`accelerate launch` of `metareward.training.worker` on `job_path` with the shipped config."""
    import torch

    if not torch.cuda.is_available() and config.distributed != "ddp":
        raise ValueError(f"training.distributed {config.distributed!r} needs CUDA GPUs; on CPU use 'ddp' (gloo)")
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_file(config.distributed)),
        "--num_processes", str(config.num_processes),
        "--main_process_port", str(_free_port()),
        "--module", "metareward.training.worker", str(job_path),
    ]  # fmt: skip


def run_child(job: TrainJob, job_dir: Path, config: TrainingConfig) -> None:
    """Run `job` in `config.num_processes` ranks under `accelerate launch`, in a process group of
    its own that dies with this process; any exception here (a cancelled flow run included) kills
    the group before it propagates. Raises `RuntimeError` with the child's output tail when it fails."""
    import torch

    job_path = job_dir / "job.json"
    job.write(job_path)
    environment = child_environment()
    if not torch.cuda.is_available():
        environment["ACCELERATE_USE_CPU"] = "true"
    log_path = job_dir / "child.log"
    command = launch_command(job_path, config)
    logger.info("training in %d processes: %s", config.num_processes, " ".join(command))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
        )
        try:
            returncode = process.wait()
        finally:
            # The ranks may outlive a failed launcher for a moment: the group must be empty either way.
            kill_group(process)
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"training child (accelerate launch, {config.num_processes} processes) exited with {returncode}:\n{tail}")
