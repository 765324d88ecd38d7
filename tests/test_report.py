"""Diagnostics in the store and in the UI: the per-iteration artifacts and plots, `metareward
report` over a run folder of real Parquet artifacts, and the report task and flow through a real
Prefect API. The iterations are hand-made (tests/fixtures/iterations.py), so their numbers are known."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from metareward import report as run_report
from metareward.cli import app
from metareward.config import RunConfig
from metareward.storage import ArtifactInfo, StorageConfig, Store, is_complete, read_artifact, read_manifest, write_artifact
from tests.fixtures.iterations import hand_made_iteration, write_iteration

RUN = "diag"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_folder(tmp_path) -> Store:
    """Iteration 1 with meta-judge (always says A) and training; iteration 2 without either (no
    judge pairs trained, no pairs to train on); iteration 3 killed after sampling its prompts."""
    store = Store(StorageConfig(root=str(tmp_path / "runs")))
    write_iteration(store, RUN, hand_made_iteration(1))
    write_iteration(store, RUN, hand_made_iteration(2, score=lambda p, r, j: 5.0, winner=None, train_losses=None))
    prompts = hand_made_iteration(3).prompts
    write_artifact(store, store.stage_uri(RUN, 3, "prompts"), prompts, ArtifactInfo(stage="sample_prompts", schema_version=1, fingerprint="p3"))
    return store


def test_iteration_diagnostics_are_written_beside_the_artifacts_and_reused_while_up_to_date(run_folder):
    store = run_folder
    written = run_report.write_iteration_diagnostics(store, RUN, 1)
    assert written.uri == store.stage_uri(RUN, 1, "diagnostics")
    row = read_artifact(store, written.uri)
    assert row["iteration"].tolist() == [1] and row["meta_position_bias"].tolist() == [1.0]
    histograms = read_artifact(store, written.histograms_uri)
    assert histograms.loc[histograms["histogram"] == "judgment_score", "count"].sum() == row["judge_judgments"].iloc[0]
    for name in run_report.ITERATION_PLOTS:
        assert store.read_bytes(store.join(written.uri, name)).startswith(PNG_MAGIC)
    manifest = read_manifest(store, written.uri)
    assert manifest["stage"] == "report" and set(manifest["upstream"]) >= {"summary", "judgments", "meta_judgments", "train"}

    # up to date: read back, not written again
    again = run_report.iteration_diagnostics(store, RUN, 1)
    assert read_manifest(store, written.uri)["created_at"] == manifest["created_at"]
    assert again.metrics.equals(row) and again.plots == written.plots

    # an input rewritten with other rows: computed again from what is there now
    judgments = read_artifact(store, store.stage_uri(RUN, 1, "judgments"))
    judgments = judgments[judgments["response_id"] != judgments["response_id"].iloc[0]]
    write_artifact(store, store.stage_uri(RUN, 1, "judgments"), judgments, ArtifactInfo(stage="judge", schema_version=1, fingerprint="judgments-1-27"))
    recomputed = run_report.iteration_diagnostics(store, RUN, 1)
    assert recomputed.metrics["judge_judgments"].tolist() == [len(judgments)] != row["judge_judgments"].tolist()


def test_a_new_pipeline_version_computes_the_diagnostics_again(run_folder, monkeypatch):
    from metareward import contract

    store = run_folder
    written = run_report.write_iteration_diagnostics(store, RUN, 1)
    before = read_manifest(store, written.uri)
    monkeypatch.setattr(contract, "PIPELINE_VERSION", "metareward-pipeline-next")
    again = run_report.iteration_diagnostics(store, RUN, 1)
    after = read_manifest(store, again.uri)
    assert after["fingerprint"] != before["fingerprint"]  # written again, under the new version
    assert after["pipeline_version"] == "metareward-pipeline-next"
    assert again.metrics.equals(read_artifact(store, written.uri))


def test_diagnostics_need_a_finished_iteration(run_folder):
    with pytest.raises(FileNotFoundError, match="iteration 3 of run 'diag' has no complete summary"):
        run_report.write_iteration_diagnostics(run_folder, RUN, 3)


def test_report_command_writes_one_page_with_every_iteration_and_its_trends(run_folder):
    result = CliRunner().invoke(app, ["report", RUN, "--root", run_folder.root, "--no-publish"])
    assert result.exit_code == 0, result.output
    page_uri = run_report.report_uri(run_folder, RUN)
    assert f"Report: {page_uri}" in result.output.replace("\n", "")
    page = run_folder.read_bytes(page_uri).decode("utf-8")

    assert "| metric | iter 1 | iter 2 |" in page
    assert "| meta_position_bias | 1 | - |" in page  # iteration 2 had no meta-judge: null, not an error
    assert "| judge_all_same_share | 0 | 1 |" in page  # iteration 2's judge gave every response 5
    assert "| judge_top_score_share | 0 | 1 |" in page
    assert "| train_final_loss | 0.5 | - |" in page
    assert "| actor_pairs_dropped_all_scores_equal | 0 | 3 |" in page
    assert "iteration 3: incomplete" in page
    for name in run_report.TREND_PLOTS:
        assert f"]({name})" in page  # linked beside the page
        assert run_folder.read_bytes(run_folder.join(run_folder.run_uri(RUN), "report", name)).startswith(PNG_MAGIC)
    # the diagnostics of each complete iteration were stored on the way
    assert is_complete(run_folder, run_folder.stage_uri(RUN, 1, "diagnostics"))
    assert is_complete(run_folder, run_folder.stage_uri(RUN, 2, "diagnostics"))
    assert not run_folder.exists(run_folder.stage_uri(RUN, 3, "diagnostics"))

    shown = CliRunner().invoke(app, ["show", RUN, "--root", run_folder.root])
    assert shown.exit_code == 0, shown.output
    assert page_uri in shown.output.replace("\n", "") and "brings it up to date" in shown.output


def test_report_command_on_a_run_without_a_complete_iteration_says_so(tmp_path):
    result = CliRunner().invoke(app, ["report", "nothing-here", "--root", str(tmp_path), "--no-publish"])
    assert result.exit_code == 1
    assert "run 'nothing-here' has no complete iteration" in result.output.replace("\n", "")


def test_report_task_publishes_the_iterations_diagnostics_in_the_ui(prefect_api, run_folder):
    from prefect import flow
    from prefect.artifacts import Artifact

    from tasks.report import report

    config = RunConfig(name=RUN, storage=run_folder.config).for_iteration(1)

    @flow
    def end_of_iteration() -> str:
        return report(run_folder.config, config)

    assert end_of_iteration() == run_folder.stage_uri(RUN, 1, "diagnostics")
    markdown = Artifact.get(f"{RUN}-iter-1-diagnostics-summary")
    assert markdown.type == "markdown"
    assert markdown.data.count("](data:image/png;base64,") == len(run_report.ITERATION_PLOTS)
    assert "| meta_position_bias | 1 |" in markdown.data and "| meta_w1 | 0 |" in markdown.data
    rows = {row["metric"]: row["value"] for row in json.loads(Artifact.get(f"{RUN}-iter-1-diagnostics-rows").data)}
    assert rows["meta_position_bias"] == 1.0 and rows["train_final_loss"] == 0.5 and rows["judge_judgments"] == 27


def test_report_command_publishes_the_page_through_the_report_flow(prefect_api, run_folder):
    from prefect.artifacts import Artifact

    # a Prefect API is set (the harness), so the command publishes without being asked
    result = CliRunner().invoke(app, ["report", RUN, "--root", run_folder.root])
    assert result.exit_code == 0, result.output
    page = Artifact.get(f"{RUN}-report")
    assert page.type == "markdown" and page.flow_run_id is not None
    assert page.data.count("](data:image/png;base64,") == len(run_report.TREND_PLOTS)
    assert "| meta_position_bias | 1 | - |" in page.data
    rows = json.loads(Artifact.get(f"{RUN}-report-rows").data)
    assert [row["iteration"] for row in rows] == [1, 2] and rows[1]["judge_all_same_share"] == 1.0


def test_tables_left_by_an_earlier_run_of_the_iteration_are_not_read(run_folder):
    # iteration 1 run again without judge pairs and with every pair dropped before training: its
    # meta_judgments, elo, judge_pairs and train tables from the first run stay in storage
    write_iteration(run_folder, RUN, hand_made_iteration(1, winner=None, train_losses=None))
    assert is_complete(run_folder, run_folder.stage_uri(RUN, 1, "meta_judgments"))
    row = run_report.write_iteration_diagnostics(run_folder, RUN, 1).metrics.iloc[0]
    assert row["meta_judgments"] is pd.NA and pd.isna(row["meta_position_bias"]) and row["judge_pairs"] is pd.NA
    assert row["train_trained"] == False and pd.isna(row["train_final_loss"])  # noqa: E712 (a nullable boolean)
    assert row["actor_pairs"] == 3
