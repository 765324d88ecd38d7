"""Bad input files are refused before Prefect starts: through the real `metareward` command (exit 2,
one message naming the config key, the file, the row and the column) and again inside the flows,
for runs started from the UI or a deployment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metareward.config import load_config
from metareward.inputs import InputError, check_inputs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
# What the CLI prints once it reaches Prefect (metareward.cli.application._prepare_prefect): a refusal comes first.
PREFECT_REACHED = ("temporary local API", "Prefect API:")


def _config(tmp_path: Path, **changes) -> Path:
    """The demo config with its storage in tmp_path and `changes` merged into its sections."""
    data = yaml.safe_load(DEMO.read_text())
    data["storage"] = {"root": str(tmp_path / "runs")}
    for section, value in changes.items():
        data[section] = {**data[section], **value} if isinstance(value, dict) and isinstance(data.get(section), dict) else value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _metareward(*args: str) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    # -m from the repository root: this checkout's package, whatever the venv's console script points at.
    return subprocess.run(
        [sys.executable, "-m", "metareward.cli", *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
    )


def _refused(result: subprocess.CompletedProcess, *parts: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert not any(text in out for text in PREFECT_REACHED), out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out  # one message, no traceback
    for part in parts:
        assert part in out, (part, out)
    return out


@pytest.mark.parametrize(
    "name, content, parts",
    [
        ("missing.jsonl", None, ["does not exist"]),
        ("texts.jsonl", b'{"text": "a"}\n{"text": "b"}\n', ["no 'prompt' column", "'text'"]),
        ("empty.jsonl", b'{"prompt": "a"}\n\n{"prompt": "  "}\n{"prompt": "c"}\n', ["column 'prompt'", "row 2 (line 3)"]),
        ("broken.jsonl", b'{"prompt": "a"}\n{"prompt": "b",}\n', ["line 2, column 16 is not valid JSON"]),
        ("empty.csv", b'prompt_id,prompt\na,one\nb,\nc,three\n', ["column 'prompt'", "row 2 (line 3)"]),
        ("no-prompt.csv", b'question\nwhy?\n', ["no 'prompt' column", "'question'"]),
    ],
)
def test_a_bad_prompt_file_is_refused_before_prefect_starts(tmp_path, name, content, parts):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    config = _config(tmp_path, prompts={"source": str(path)})
    _refused(_metareward("run", str(config)), str(config), "prompts.source", str(path), *parts)


def test_a_pool_too_small_and_a_bad_preference_set_are_refused_before_prefect_starts(tmp_path):
    pool = tmp_path / "pool.csv"
    pool.write_text("prompt\n" + "".join(f"question {number}?\n" for number in range(10)))  # 1 held out, 9 to train on
    config = _config(tmp_path, prompts={"source": str(pool), "per_iteration": 5}, iterations={2: {"prompts_per_iteration": 12}})
    _refused(_metareward("iterate", str(config)), "iterations.2.prompts_per_iteration", "iteration 2 samples 12 prompts", "holds 9")

    preferences = tmp_path / "preferences.jsonl"
    preferences.write_text('{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n{"prompt": "3+3?", "chosen": "6"}\n')
    config = _config(tmp_path, evaluation={"preference_set": str(preferences)})
    # Not used by a run without the evaluation, so not read; `evaluate` and a run that evaluates refuse it.
    assert check_inputs(load_config(config)) == []
    _refused(_metareward("evaluate", str(config)), "evaluation.preference_set", str(preferences), "column 'rejected' empty or not text at row 2 (line 2)")
    config = _config(tmp_path, evaluation={"preference_set": str(preferences), "at_end_of_iteration": True})
    _refused(_metareward("run", str(config)), "evaluation.preference_set", str(preferences))


def test_prompts_repeating_across_iterations_are_a_note_not_an_error(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(f'{{"prompt": "question {number}?"}}\n' for number in range(10)))  # 9 to train on
    config = load_config(_config(tmp_path, prompts={"source": str(pool), "per_iteration": 4}, max_iterations=3, iterations={}))
    # Without replacement iterations 1-2 take 8 prompts; 3 does not fit in what is left and starts a new pass.
    notes = check_inputs(config, source="run.yaml")
    assert len(notes) == 1 and "from iteration 3 on" in notes[0] and "holds 9" in notes[0]
    with_replacement = config.model_copy(update={"prompts": config.prompts.model_copy(update={"without_replacement": False})})
    assert check_inputs(with_replacement) == []
    no_holdout = config.model_copy(update={"prompts": config.prompts.model_copy(update={"holdout_fraction": 0.0})})
    with pytest.raises(InputError, match="the evaluation needs held-out prompts"):
        check_inputs(no_holdout, evaluation=True)


def test_the_flows_repeat_the_check_for_runs_started_from_the_ui_or_a_deployment(tmp_path):
    from flows.evaluate import evaluate_flow
    from flows.run import run_flow

    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": \n')
    config = load_config(_config(tmp_path, prompts={"source": str(path)}))
    # The flows' bodies: the check comes first, before the run's slot, the seed model or an engine.
    for flow_function in (run_flow.fn, evaluate_flow.fn):
        with pytest.raises(InputError, match=r"run demo: prompts.source: prompt file .*broken.jsonl: line 2, column 12"):
            flow_function(config)
