"""Diagnostics in the store: per iteration (Parquet, PNG plots) and across the run (a markdown page).

Per iteration i, after its `summary` (`write_iteration_diagnostics`):

    {root}/{run}/iter-{i}/histograms/       artifact: the distributions (`diagnostics.iteration_histograms`)
    {root}/{run}/iter-{i}/diagnostics/      artifact: one row of metrics (`diagnostics.iteration_metrics`),
        scores.png, lengths.png             and beside its data the plots of those distributions

The `diagnostics` manifest is written last, so once it exists the histograms and plots are there
too. Its fingerprint covers the fingerprint and data digest of every artifact it was computed
from and `DIAGNOSTICS_VERSION`; `iteration_diagnostics` reuses stored diagnostics only while that
still matches.

Across the run (`write_run_report`): `{root}/{run}/report/report.md`, one page with every metric
per iteration and trend plots (`trend-*.png` beside it, linked by relative path), from the
diagnostics of each complete iteration (computed and stored where missing or stale).

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend:
the tasks run in worker threads). Markdown for the Prefect UI embeds the same PNGs as base64
`data:` URIs (`docs/diagnostics.md` says why).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from metareward import contract, diagnostics as dx
from metareward.schema import SCHEMA_VERSION
from metareward.stages import (
    ACTOR_PAIRS,
    ELO,
    JUDGE_PAIRS,
    JUDGMENTS,
    META_JUDGMENTS,
    RESPONSES,
    SCORES,
    SUMMARY,
    TRAIN,
)
from metareward.storage import MANIFEST_FILE, ArtifactInfo, Store, is_complete, read_artifact, read_manifest, write_artifact

DIAGNOSTICS = "diagnostics"
HISTOGRAMS = "histograms"
REPORT_DIR = "report"
REPORT_FILE = "report.md"
STAGE = "report"

# Bump when a metric changes meaning: stored diagnostics made by older code are then recomputed.
DIAGNOSTICS_VERSION = "metareward-diagnostics-1"

SCORES_PLOT = "scores.png"
LENGTHS_PLOT = "lengths.png"
ITERATION_PLOTS = (SCORES_PLOT, LENGTHS_PLOT)
TREND_PLOTS = ("trend-scores.png", "trend-lengths.png", "trend-biases.png", "trend-pairs.png")

# The artifacts diagnostics read: `IterationTables` field -> (artifact, the stage that writes it).
_INPUTS = {
    "responses": (RESPONSES, "generate"),
    "judgments": (JUDGMENTS, "judge"),
    "scores": (SCORES, "judge"),
    "meta_judgments": (META_JUDGMENTS, "meta_judge"),
    "elo": (ELO, "judge_pairs"),
    "actor_pairs": (ACTOR_PAIRS, "actor_pairs"),
    "judge_pairs": (JUDGE_PAIRS, "judge_pairs"),
    "train": (TRAIN, "train"),
}

# The metrics the pages show, by section; every other column stays in the Parquet row.
SECTIONS: dict[str, tuple[str, ...]] = {
    "Judge": (
        "judge_judgments", "judge_status_ok", "judge_status_forced", "judge_status_no_score", "judge_status_out_of_range",
        "judge_valid_share", "judge_score_mean", "judge_score_var", "judge_top_score_share",
        "judge_response_score_var_mean", "judge_prompts_scored", "judge_all_same_share",
    ),
    "Actor": (
        "actor_responses", "actor_duplicates_dropped", "actor_chars_mean", "actor_chars_median", "actor_chars_p90",
        "actor_tokens_mean", "actor_tokens_p90", "actor_truncated_share", "actor_pairs",
        "actor_chosen_chars_mean", "actor_rejected_chars_mean", "actor_chosen_score_mean", "actor_rejected_score_mean",
        "actor_chosen_longer_share",
    ),
    "Meta-judge": (
        "meta_judgments", "meta_status_ok", "meta_status_forced", "meta_status_no_verdict", "meta_decided",
        "meta_position_bias", "meta_score_bias", "meta_score_bias_comparisons", "meta_length_bias",
        "meta_length_bias_comparisons", "meta_w1", "meta_w2", "meta_elo_spread_mean", "meta_targets", "judge_pairs",
        "judge_chosen_higher_score_share", "judge_chosen_longer_share",
    ),
    "Training": ("train_trained", "train_pairs", "train_pairs_used", "train_steps", "train_final_loss", "train_final_margin", "train_final_accuracy"),
}
DROP_PREFIXES = ("actor_pairs_dropped_", "meta_targets_dropped_", "judge_pairs_dropped_")


@dataclass
class IterationReport:
    """What `write_iteration_diagnostics` wrote (or `iteration_diagnostics` found) for one iteration."""

    iteration: int
    uri: str
    histograms_uri: str
    metrics: pd.DataFrame
    histograms: pd.DataFrame
    plots: dict[str, bytes] = field(default_factory=dict)


@dataclass
class RunReport:
    """The run's report page: where it is, its markdown (images by relative path), the table behind
    it, its plots, and the iterations left out (incomplete) with why."""

    run: str
    uri: str
    markdown: str
    table: pd.DataFrame
    plots: dict[str, bytes]
    skipped: dict[int, str]

    def markdown_with_embedded_plots(self) -> str:
        """The page with each plot inlined as a data: URI (for the Prefect UI)."""
        return _run_markdown(self.run, self.table, self.skipped, image=lambda name: data_uri(self.plots[name]))


# ----------------------------------------------------------------------------------------------
# reading an iteration


def read_iteration_tables(store: Store, run: str, iteration: int) -> tuple[dx.IterationTables, dict[str, str]]:
    """The iteration's tables (None where the iteration wrote none) and the stage summaries from its
    `summary` artifact, plus the keys of what was read, by artifact name (`input_keys`)."""
    summary, uris, keys = _inputs(store, run, iteration)
    tables = dx.IterationTables(
        iteration=iteration, summaries={str(stage): json.loads(text) for stage, text in zip(summary["stage"], summary["summary"])}
    )
    for attribute, uri in uris.items():
        setattr(tables, attribute, read_artifact(store, uri))
    return tables, keys


def input_keys(store: Store, run: str, iteration: int) -> dict[str, str]:
    """The keys of the artifacts diagnostics read, by artifact name: the summary and each complete
    artifact of a stage the summary lists (`_inputs`)."""
    return _inputs(store, run, iteration)[2]


def _inputs(store: Store, run: str, iteration: int) -> tuple[pd.DataFrame, dict[str, str], dict[str, str]]:
    """The summary table, the URIs to read by `IterationTables` field, and their keys by artifact name.

    Only the artifacts of stages the summary lists with an artifact are read: artifacts stay at
    fixed places, so a stage that did not run this time (no meta-judge after `train_judge_pairs`
    was turned off, no `train` table when the pairs were all dropped) may have left the table of an
    earlier run of the same iteration, which is not this iteration's. The summary must be complete
    (the iteration finished); a missing one raises FileNotFoundError naming it."""
    summary_uri = store.stage_uri(run, iteration, SUMMARY)
    if not is_complete(store, summary_uri):
        raise FileNotFoundError(f"iteration {iteration} of run {run!r} has no complete summary at {summary_uri}: it did not finish")
    keys = {SUMMARY: _key(read_manifest(store, summary_uri))}
    summary = read_artifact(store, summary_uri)
    wrote = {str(stage) for stage, uri in zip(summary["stage"], summary["uri"]) if uri}
    uris = {}
    for attribute, (name, stage) in _INPUTS.items():
        uri = store.stage_uri(run, iteration, name)
        if stage in wrote and is_complete(store, uri):
            keys[name] = _key(read_manifest(store, uri))
            uris[attribute] = uri
    return summary, uris, keys


def _key(manifest: Mapping[str, Any]) -> str:
    """An input's identity: its fingerprint (what it was made from) and its bytes' digest (a stage
    run again on the same inputs may write other rows, e.g. sampled on another GPU)."""
    return f"{manifest['fingerprint']}:{manifest['data_sha256']}"


def _fingerprint(keys: Mapping[str, str], part: str) -> str:
    """`metareward.contract.digest` (with the pipeline and schema versions) over the inputs' keys."""
    return contract.digest(f"diagnostics/{part}", {"version": DIAGNOSTICS_VERSION, "inputs": dict(keys)})


# ----------------------------------------------------------------------------------------------
# one iteration


def write_iteration_diagnostics(store: Store, run: str, iteration: int) -> IterationReport:
    """Compute the iteration's diagnostics from its artifacts and write them: `histograms`, the
    plots, then `diagnostics` (its manifest last)."""
    tables, keys = read_iteration_tables(store, run, iteration)
    metrics = dx.iteration_metrics(tables)
    histograms = dx.iteration_histograms(tables)
    upstream = {name: store.stage_uri(run, iteration, name) for name in keys}

    def info(part: str) -> ArtifactInfo:
        return ArtifactInfo(
            stage=STAGE,
            schema_version=SCHEMA_VERSION,
            pipeline_version=contract.PIPELINE_VERSION,
            fingerprint=_fingerprint(keys, part),
            upstream=upstream,
        )

    uri = store.stage_uri(run, iteration, DIAGNOSTICS)
    store.rm(store.join(uri, MANIFEST_FILE))  # an old manifest must not vouch for the new histograms and plots
    histograms_uri = store.stage_uri(run, iteration, HISTOGRAMS)
    write_artifact(store, histograms_uri, histograms, info(HISTOGRAMS))
    plots = iteration_plots(histograms, iteration)
    for name, png in plots.items():
        store.write_bytes(png, store.join(uri, name))
    write_artifact(store, uri, metrics, info(DIAGNOSTICS))
    return IterationReport(iteration, uri, histograms_uri, metrics, histograms, plots)


def iteration_diagnostics(store: Store, run: str, iteration: int) -> IterationReport:
    """The iteration's diagnostics from storage when they are complete and were computed from the
    artifacts there now (same fingerprint); otherwise computed and written again."""
    uri = store.stage_uri(run, iteration, DIAGNOSTICS)
    histograms_uri = store.stage_uri(run, iteration, HISTOGRAMS)
    if is_complete(store, uri) and is_complete(store, histograms_uri):
        expected = _fingerprint(input_keys(store, run, iteration), DIAGNOSTICS)
        if read_manifest(store, uri)["fingerprint"] == expected and all(store.exists(store.join(uri, name)) for name in ITERATION_PLOTS):
            plots = {name: store.read_bytes(store.join(uri, name)) for name in ITERATION_PLOTS}
            return IterationReport(iteration, uri, histograms_uri, read_artifact(store, uri), read_artifact(store, histograms_uri), plots)
    return write_iteration_diagnostics(store, run, iteration)


def iteration_markdown(report: IterationReport, image: Callable[[str], str]) -> str:
    """The iteration's diagnostics as markdown: the plots (`image(name)` gives each one's src), then
    each section's metrics, then the drops by reason."""
    row = report.metrics.iloc[0]
    lines = [f"# Iteration {report.iteration}: diagnostics", ""]
    lines += [f"![{name}]({image(name)})" for name in ITERATION_PLOTS] + [""]
    for section, names in SECTIONS.items():
        lines += [f"## {section}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_shown(row.get(name))} |" for name in names]
        lines.append("")
    drops = [(name, row[name]) for name in report.metrics.columns if name.startswith(DROP_PREFIXES)]
    lines += ["## Dropped, by reason", "", "| what | count |", "|---|---|"]
    lines += [f"| {name} | {_shown(value)} |" for name, value in drops]
    lines += ["", f"Tables: `{report.uri}`, `{report.histograms_uri}`. How to read them: docs/diagnostics.md."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# the run


def run_diagnostics(store: Store, run: str) -> tuple[list[IterationReport], dict[int, str]]:
    """The diagnostics of every complete iteration of `run` (`iteration_diagnostics`), and the
    iterations left out with why."""
    reports, skipped = [], {}
    for iteration in store.list_iterations(run):
        if not is_complete(store, store.stage_uri(run, iteration, SUMMARY)):
            skipped[iteration] = "incomplete (no summary): it has not finished"
            continue
        reports.append(iteration_diagnostics(store, run, iteration))
    return reports, skipped


def write_run_report(store: Store, run: str) -> RunReport:
    """Write `{run}/report/report.md` and its trend plots from every complete iteration's
    diagnostics. A run without any complete iteration raises FileNotFoundError naming the run."""
    reports, skipped = run_diagnostics(store, run)
    if not reports:
        raise FileNotFoundError(f"run {run!r} has no complete iteration under {store.run_uri(run)}")
    table = pd.concat([report.metrics for report in reports], ignore_index=True)
    plots = trend_plots(table)
    folder = store.join(store.run_uri(run), REPORT_DIR)
    for name, png in plots.items():
        store.write_bytes(png, store.join(folder, name))
    markdown = _run_markdown(run, table, skipped, image=lambda name: name)
    uri = store.write_bytes(markdown.encode("utf-8"), store.join(folder, REPORT_FILE))
    return RunReport(run=run, uri=uri, markdown=markdown, table=table, plots=plots, skipped=skipped)


def report_uri(store: Store, run: str) -> str:
    """Where `write_run_report` puts the run's page."""
    return store.join(store.run_uri(run), REPORT_DIR, REPORT_FILE)


def _run_markdown(run: str, table: pd.DataFrame, skipped: Mapping[int, str], image: Callable[[str], str]) -> str:
    iterations = [int(i) for i in table["iteration"]]
    header = "| metric | " + " | ".join(f"iter {i}" for i in iterations) + " |"
    rule = "|---|" + "---|" * len(iterations)
    lines = [f"# Run {run}: diagnostics across iterations", ""]
    lines += [f"![{name}]({image(name)})" for name in TREND_PLOTS] + [""]
    for section, names in SECTIONS.items():
        lines += [f"## {section}", "", header, rule]
        lines += [f"| {name} | " + " | ".join(_shown(value) for value in table[name]) + " |" for name in names if name in table]
        lines.append("")
    drops = [name for name in table.columns if name.startswith(DROP_PREFIXES)]
    lines += ["## Dropped, by reason", "", header, rule]
    lines += [f"| {name} | " + " | ".join(_shown(value) for value in table[name]) + " |" for name in drops]
    if skipped:
        lines += ["", "## Left out", ""] + [f"- iteration {i}: {why}" for i, why in sorted(skipped.items())]
    lines += ["", "How to read these numbers: docs/diagnostics.md. Each iteration's own page and tables: `iter-{i}/diagnostics/`."]
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# plots


def data_uri(png: bytes) -> str:
    """A PNG as a `data:image/png;base64,...` URI (an <img> src the Prefect UI accepts)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(panels: int):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * panels, 3.0), dpi=80, layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # No timestamp or version in the file: the same numbers give the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _bars(axis, histograms: pd.DataFrame, name: str, label: str | None = None, step: bool = False) -> None:
    rows = histograms[histograms["histogram"] == name]
    if rows.empty:
        axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        return
    left, right, count = rows["bin_left"].to_numpy(), rows["bin_right"].to_numpy(), rows["count"].to_numpy()
    if step:
        axis.stairs(count, np.r_[left, right[-1]], label=label, linewidth=1.5)
    else:
        axis.bar(left, count, width=right - left, align="edge", alpha=0.6, edgecolor="black", linewidth=0.5, label=label)


def iteration_plots(histograms: pd.DataFrame, iteration: int) -> dict[str, bytes]:
    """`scores.png` (judgment scores, response mean scores) and `lengths.png` (response lengths in
    characters with the actor pairs' chosen and rejected lengths, and in tokens), from the
    histogram table."""
    figure, (judgment, response) = _figure(2)
    _bars(judgment, histograms, dx.JUDGMENT_SCORE)
    judgment.set(title=f"iteration {iteration}: judgment scores", xlabel="score (valid judgments)", ylabel="judgments")
    _bars(response, histograms, dx.RESPONSE_SCORE)
    response.set(title="response mean scores", xlabel="mean score", ylabel="responses")
    scores = _png(figure)

    figure, (chars, tokens) = _figure(2)
    _bars(chars, histograms, dx.RESPONSE_CHARS, label="responses")
    if (histograms["histogram"] == dx.ACTOR_CHOSEN_CHARS).any():
        _bars(chars, histograms, dx.ACTOR_CHOSEN_CHARS, label="chosen", step=True)
        _bars(chars, histograms, dx.ACTOR_REJECTED_CHARS, label="rejected", step=True)
        chars.legend(fontsize="small")
    chars.set(title=f"iteration {iteration}: response length", xlabel="characters", ylabel="count")
    _bars(tokens, histograms, dx.RESPONSE_TOKENS)
    tokens.set(title="response length", xlabel="tokens", ylabel="responses")
    return {SCORES_PLOT: scores, LENGTHS_PLOT: _png(figure)}


def _lines(axis, table: pd.DataFrame, columns: Sequence[tuple[str, str]], title: str, ylabel: str) -> None:
    iterations = table["iteration"].to_numpy(dtype=int)
    for column, label in columns:
        values = table[column].astype("float64").to_numpy() if column in table else np.full(len(table), np.nan)
        axis.plot(iterations, values, marker="o", label=label)
    axis.set(title=title, xlabel="iteration", ylabel=ylabel)
    axis.set_xticks(iterations)
    axis.legend(fontsize="small")


def trend_plots(table: pd.DataFrame) -> dict[str, bytes]:
    """The run's trends, one PNG each (names TREND_PLOTS): scores (mean, top-score share, all-same
    share), lengths (responses, chosen, rejected; tokens), biases (position, score, length; 0.5 is
    none), pairs (actor and judge pairs, pairs used in training)."""
    plots = {}
    figure, (mean, shares) = _figure(2)
    _lines(mean, table, [("judge_score_mean", "mean judgment score"), ("actor_chosen_score_mean", "chosen"), ("actor_rejected_score_mean", "rejected")], "scores", "score (0-5)")
    _lines(shares, table, [("judge_top_score_share", "share of top scores"), ("judge_all_same_share", "prompts all same score"), ("judge_valid_share", "valid judgments")], "score shares", "share")
    plots[TREND_PLOTS[0]] = _png(figure)

    figure, (chars, tokens) = _figure(2)
    _lines(chars, table, [("actor_chars_mean", "responses (mean)"), ("actor_chars_p90", "responses (p90)"), ("actor_chosen_chars_mean", "chosen"), ("actor_rejected_chars_mean", "rejected")], "response length", "characters")
    _lines(tokens, table, [("actor_tokens_mean", "mean"), ("actor_tokens_p90", "p90"), ("actor_truncated_share", "truncated share")], "response length", "tokens")
    plots[TREND_PLOTS[1]] = _png(figure)

    figure, (biases,) = _figure(1)
    _lines(biases, table, [("meta_position_bias", "position (A)"), ("meta_score_bias", "higher score"), ("meta_length_bias", "longer")], "meta-judge biases", "share of wins")
    biases.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    biases.set_ylim(-0.05, 1.05)
    plots[TREND_PLOTS[2]] = _png(figure)

    figure, (pairs,) = _figure(1)
    _lines(pairs, table, [("actor_pairs", "actor pairs"), ("judge_pairs", "judge pairs"), ("train_pairs_used", "used in training")], "pairs", "pairs")
    plots[TREND_PLOTS[3]] = _png(figure)
    return plots
