"""A training's scratch folder: a killed training's folder is removed by the next training, a
running training's folder is kept (real processes, real locks)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

from metareward.training.scratch import PREFIX, remove_abandoned, scratch_folder, scratch_path

_HOLD_A_SCRATCH_FOLDER = """
import sys, time
from metareward.training.scratch import scratch_folder
with scratch_folder(sys.argv[1], name=sys.argv[2] or None) as path:
    (path / "optimizer.pt").write_bytes(b"0" * 1000)
    print(path, flush=True)
    time.sleep(600)
"""


def _holder(root: Path, name: str = "") -> tuple[subprocess.Popen, Path]:
    child = subprocess.Popen([sys.executable, "-c", _HOLD_A_SCRATCH_FOLDER, str(root), name], stdout=subprocess.PIPE, text=True)
    return child, Path(child.stdout.readline().strip())


def test_a_killed_trainings_folder_goes_and_a_running_ones_stays(tmp_path, caplog):
    killed, killed_folder = _holder(tmp_path)
    running, running_folder = _holder(tmp_path)
    unlocked = tmp_path / f"{PREFIX}made-by-an-older-version"
    unlocked.mkdir()
    try:
        killed.send_signal(signal.SIGKILL)  # no clean-up runs
        killed.wait(timeout=30)
        assert (killed_folder / "optimizer.pt").is_file()

        with caplog.at_level(logging.WARNING, logger="metareward.training.scratch"):
            with scratch_folder(str(tmp_path)) as mine:
                assert mine.is_dir() and mine.name.startswith(PREFIX)
                assert remove_abandoned(str(tmp_path)) == []  # nor is a folder in use taken for abandoned
        assert not killed_folder.exists()
        assert "removed 1 scratch folder(s) of killed trainings" in caplog.text and str(killed_folder) in caplog.text
        assert (running_folder / "optimizer.pt").is_file() and unlocked.is_dir()
        assert not mine.exists()
    finally:
        running.kill()
        running.wait()
    assert remove_abandoned(str(tmp_path)) == [running_folder]


def test_a_named_folder_is_where_the_other_workers_look_and_goes_once_its_holder_is_killed(tmp_path):
    """The Ray Train workers of one node share the folder named by the run's token."""
    holder, folder = _holder(tmp_path, name="0123abcd")
    try:
        assert folder == scratch_path("0123abcd", str(tmp_path)) and folder.stat().st_mode & 0o777 == 0o700
        assert remove_abandoned(str(tmp_path)) == []  # its holder lives
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert remove_abandoned(str(tmp_path)) == [folder] and not folder.exists()
    finally:
        holder.kill()
        holder.wait()
