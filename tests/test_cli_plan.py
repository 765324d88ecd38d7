"""`metareward plan`: the cost model through the command line."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from metareward import planning
from metareward.cli import app
from metareward.config import load_config
from metareward.storage import StorageConfig, Store
from tests.fixtures.iterations import hand_made_iteration, write_iteration

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper-llama3-8b.yaml"


def test_plan_prints_the_paper_configs_counts_and_hours():
    result = CliRunner().invoke(app, ["plan", str(PAPER_CONFIG), "--tokens-per-second", "2500", "--gpus", "1", "--no-from-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    for count in ("5,000", "35,000", "385,000", "550,000", "1,100,000"):
        assert count in out
    expected = planning.plan_run(load_config(PAPER_CONFIG), gpus=1, tokens_per_second=2500.0)
    for item in expected.iterations:
        assert f"{item.hours:,.2f}" in out
    assert f"{expected.hours:,.2f}" in out
    generated = expected.total_tokens("generated_tokens")
    assert generated > 1e6 and f"{generated / 1e6:.1f}M" in out
    assert "assumed: 0.5 x actor.max_tokens 1024" in out
    assert "DPO is not in the hours" in out


def test_plan_measures_lengths_from_the_runs_stored_iteration(tmp_path):
    config = load_config(PAPER_CONFIG).model_dump(mode="json")
    config["storage"] = {"root": str(tmp_path / "runs")}
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    write_iteration(Store(StorageConfig(root=str(tmp_path / "runs"))), config["name"], hand_made_iteration(1))

    result = CliRunner().invoke(app, ["plan", str(config_path), "--gpus", "1"])
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    assert "measured: iteration 1 responses, mean n_tokens" in out
    assert "no token column" in out
    assert "No hours: give --tokens-per-second" in out


def test_plan_refuses_bad_numbers_and_bad_configs(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(PAPER_CONFIG), "--gpus", "0", "--no-from-run"])
    assert result.exit_code == 2 and "--gpus must be greater than 0" in result.output

    result = CliRunner().invoke(app, ["plan", str(PAPER_CONFIG), "--tokens-per-second", "-1", "--no-from-run"])
    assert result.exit_code == 2 and "--tokens-per-second must be greater than 0" in result.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\njudge: {tempreature: 0.5}\n")
    result = CliRunner().invoke(app, ["plan", str(bad)])
    assert result.exit_code == 2 and "unknown key 'judge.tempreature'" in result.output.replace("\n", "")


def test_plan_prints_its_advice_whole():
    # a terminal-wide wrap would split the advice where a reader (or a log search) looks for it
    result = CliRunner().invoke(app, ["plan", str(PAPER_CONFIG), "--gpus", "3", "--no-from-run"])
    assert result.exit_code == 0, result.output
    [advice] = [line for line in result.output.splitlines() if line.startswith("execution.backend is local")]
    assert advice.endswith("execution.ray.gpus_per_engine GPUs"), advice
