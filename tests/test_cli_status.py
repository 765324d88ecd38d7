"""`metareward status`: the forced verdicts of the judge and of the meta-judge, side by side, and
whether each iteration's M_i was promoted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from metareward.storage import StorageConfig, Store
from tests.fixtures.iterations import hand_made_iteration, write_iteration

REPO = Path(__file__).resolve().parents[1]


def test_status_shows_the_forced_counts_of_the_judge_and_of_the_meta_judge(tmp_path):
    made = hand_made_iteration(1)
    summaries = made.tables.summaries
    judgments, meta_judgments = summaries["judge"]["judgments"], summaries["meta_judge"]["meta_judgments"]
    # Counts no other column of the table holds, so each is found where it belongs.
    summaries["judge"]["statuses"] = {"ok": judgments - 23, "forced": 23}
    summaries["meta_judge"]["statuses"] = {"ok": meta_judgments - 17, "forced": 17}
    write_iteration(Store(StorageConfig(root=str(tmp_path))), "forced", made)

    result = subprocess.run(
        [sys.executable, "-m", "metareward.cli", "status", "forced", "--root", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "judgments" in line and "forced" in line)
    row = next(line for line in lines if line.lstrip("│ ").startswith("1 "))
    # rich draws the header's borders heavy (┃) and the rows' light (│)
    cells = [cell.strip() for cell in re.split("[│┃]", row)[1:-1]]
    columns = [cell.strip() for cell in re.split("[│┃]", header)[1:-1]]
    by_column = dict(zip(columns, cells))
    assert by_column["forced"] == "23" and by_column["meta forced"] == "17", (columns, cells)
    assert by_column["meta"] == str(meta_judgments)
    # a complete trained iteration: its M_i promoted (no evaluation gate), and no pre-train checks stored
    assert by_column["state"] == "trained" and by_column["promoted"] == "yes" and by_column["checks"] == "-"
    assert "promoted checkpoint: M1 iter-1/model" in result.stdout
