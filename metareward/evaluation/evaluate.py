"""The evaluation of one iteration as the flow (`flows/evaluate.py`) runs it: `evaluate_win_rate`
and `evaluate_judge_accuracy`, one model loaded at a time (`EngineSlot`).

Artifacts go to `{root}/{run}/iter-{i}/evaluation/{name}` (`evaluation_uri`) with manifests
(`metareward.storage.write_artifact`); each carries a fingerprint of its inputs (models, settings,
prompts), and an artifact that storage already holds for the same fingerprint is read back instead of
computed again (unless `refresh`). docs/evaluation.md documents all of this.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import pandas as pd

from metareward import contract, prompt_sources
from metareward.checks import CheckResult, evaluation_figures, read_results, results_table, run_checks
from metareward.checkpoints import ModelRef
from metareward.config import RunConfig
from metareward.engines.base import Engine, EngineConfig
from metareward.evaluation.accuracy import judge_accuracy, judge_preference_set, load_preference_set, preference_set_digest
from metareward.evaluation.comparisons import MODEL_X, MODEL_Y, _seed, compare_responses, generate_responses
from metareward.evaluation.heldout import heldout_eval_prompts
from metareward.evaluation.stats import win_rate_summary
from metareward.schema import SCHEMA_VERSION
from metareward.storage import ArtifactInfo, Store, is_complete, read_artifact, read_manifest, write_artifact

logger = logging.getLogger(__name__)


EVALUATION_DIR = "evaluation"
# Artifact names under {run}/iter-{i}/evaluation/ (docs/evaluation.md).
RESPONSES = "responses"
COMPARISONS = "comparisons"
WIN_RATE = "win_rate"
PREFERENCE_JUDGMENTS = "preference_judgments"
JUDGE_ACCURACY = "judge_accuracy"
POST_EVALUATION_CHECKS = "post_evaluation_checks"

EngineFor = Callable[[EngineConfig, ModelRef], Engine]


def evaluation_uri(store: Store, run: str, iteration: int, name: str) -> str:
    """`{root}/{run}/iter-{i}/evaluation/{name}`: where an evaluation artifact of iteration i lives."""
    return store.join(store.iteration_uri(run, iteration), EVALUATION_DIR, name)


def _info(
    store: Store,
    stage: contract.Stage,
    config: RunConfig,
    model: ModelRef | None,
    upstream: dict[str, str],
) -> ArtifactInfo:
    """What an evaluation artifact records: the fingerprint of its declared stage
    (`metareward.contract.EVALUATION_STAGES`) over its settings, the model that wrote it, the
    upstream artifacts' fingerprints (read from their manifests) and the input files' digests."""
    settings = contract.settings_of(stage.settings, config)
    digests = {}
    if stage.reads_prompt_pool:
        digests["prompt_pool"] = prompt_sources.source_digest(config.prompts.source, store=store)
    if stage.reads_preference_set:
        digests["preference_set"] = preference_set_digest(config.evaluation.preference_set, store=store)
    keys = {role: str(read_manifest(store, uri)["fingerprint"]) for role, uri in upstream.items()}
    sha256 = model.sha256 if model is not None else None
    return ArtifactInfo(
        stage=stage.name,
        schema_version=SCHEMA_VERSION,
        pipeline_version=contract.PIPELINE_VERSION,
        fingerprint=contract.fingerprint(stage, settings, sha256, keys, digests),
        checkpoint_sha256=sha256 if stage.uses_checkpoint else None,
        config=settings.model_dump(mode="json"),
        upstream=upstream,
    )


def _stored_or_computed(
    store: Store, uri: str, info: ArtifactInfo, compute: Callable[[], pd.DataFrame], refresh: bool
) -> pd.DataFrame:
    """The artifact at `uri` when storage holds it complete under the same fingerprint, else `compute()` written there."""
    if not refresh and is_complete(store, uri) and read_manifest(store, uri).get("fingerprint") == info.fingerprint:
        logger.info("%s: reused (same inputs)", uri)
        return read_artifact(store, uri)
    table = compute()
    write_artifact(store, uri, table, info)
    return table


class EngineSlot:
    """Holds one loaded model at a time: asking for another model releases the loaded ones first, so a
    GPU never holds the models under test and the judge together."""

    def __init__(self, store: Store, load: EngineFor | None = None):
        self._store, self._load = store, load
        self._loaded: tuple[str, str] | None = None

    def __call__(self, config: EngineConfig, model: ModelRef) -> Engine:
        from metareward.engines import load_engine, release_engines

        wanted = (model.sha256, config.model_dump_json())
        if self._loaded is not None and self._loaded != wanted:
            release_engines()
        self._loaded = wanted
        if self._load is not None:
            return self._load(config, model)
        return load_engine(config, model, fs=None if self._store.protocol == "file" else self._store.fs)

    def release(self) -> None:
        from metareward.engines import release_engines

        if self._loaded is not None:
            release_engines()
            self._loaded = None


def evaluate_win_rate(
    store: Store,
    config: RunConfig,
    iteration: int,
    model_x: ModelRef,
    model_y: ModelRef,
    judge: ModelRef,
    engines: EngineSlot,
    refresh: bool = False,
) -> dict[str, Any]:
    """X against Y on the held-out prompts, judged by `judge` (engine `evaluation.judge_engine`, else the
    run's): writes `responses`, `comparisons` and `win_rate` under iteration `iteration`'s evaluation
    folder and returns the summary (`win_rate_summary` plus the models and URIs)."""
    settings = config.evaluation
    seed = config.seed if settings.seed is None else settings.seed
    prompts = heldout_eval_prompts(store, config)
    responses, responses_uris = {}, {}
    for role, model in ((MODEL_X, model_x), (MODEL_Y, model_y)):

        def compute(model: ModelRef = model) -> pd.DataFrame:
            return generate_responses(engines(config.engine, model), prompts, settings, _seed(seed, "responses"))

        responses_uris[role] = evaluation_uri(store, config.name, iteration, f"{RESPONSES}_{role}")
        info = _info(store, contract.EVAL_RESPONSES, config, model, {})
        responses[role] = _stored_or_computed(store, responses_uris[role], info, compute, refresh)
    judge_engine = settings.judge_engine or config.engine
    comparisons_uri = evaluation_uri(store, config.name, iteration, COMPARISONS)
    upstream = {f"{RESPONSES}_{role}": uri for role, uri in responses_uris.items()}
    comparisons = _stored_or_computed(
        store,
        comparisons_uri,
        _info(store, contract.EVAL_COMPARISONS, config, judge, upstream),
        lambda: compare_responses(engines(judge_engine, judge), prompts, responses[MODEL_X], responses[MODEL_Y], settings, seed),
        refresh,
    )
    summary = win_rate_summary(comparisons, settings.bootstrap_samples, settings.confidence, seed)
    summary.update(
        {
            "iteration": iteration,
            "model_x": model_x.uri,
            "model_x_sha256": model_x.sha256,
            "model_y": model_y.uri,
            "model_y_sha256": model_y.sha256,
            "judge": judge.uri,
            "judge_sha256": judge.sha256,
            "judge_backend": judge_engine.backend,
        }
    )
    row = {name: (json.dumps(value, sort_keys=True) if isinstance(value, dict) else value) for name, value in summary.items()}
    uri = evaluation_uri(store, config.name, iteration, WIN_RATE)
    write_artifact(store, uri, pd.DataFrame([row]), _info(store, contract.EVAL_WIN_RATE, config, None, {COMPARISONS: comparisons_uri}))
    summary["uris"] = {**{f"{RESPONSES}_{role}": u for role, u in responses_uris.items()}, COMPARISONS: comparisons_uri, WIN_RATE: uri}
    return summary


def evaluate_judge_accuracy(
    store: Store,
    config: RunConfig,
    iteration: int,
    models: dict[str, ModelRef],
    engines: EngineSlot,
    refresh: bool = False,
) -> list[dict[str, Any]]:
    """Each model of `models` (role -> checkpoint, e.g. {"x": M_i, "y": M_{i-1}}) judges the preference set
    `evaluation.preference_set` (first `max_pairs` pairs; 0 = all) with the run's engine: writes
    `preference_judgments_{role}` and one `judge_accuracy` table (a row per model) and returns the rows."""
    settings = config.evaluation
    seed = config.seed if settings.seed is None else settings.seed
    pairs = load_preference_set(settings.preference_set, store=store)
    if settings.max_pairs:
        pairs = pairs.head(settings.max_pairs).reset_index(drop=True)
    rows, judgments_uris = [], {}
    for role, model in models.items():
        uri = evaluation_uri(store, config.name, iteration, f"{PREFERENCE_JUDGMENTS}_{role}")

        def compute(model: ModelRef = model) -> pd.DataFrame:
            return judge_preference_set(engines(config.engine, model), pairs, settings, seed)

        info = _info(store, contract.EVAL_PREFERENCE_JUDGMENTS, config, model, {})
        judgments = _stored_or_computed(store, uri, info, compute, refresh)
        judgments_uris[role] = uri
        rows.append(
            {
                "iteration": iteration,
                "role": role,
                "model": model.uri,
                "model_sha256": model.sha256,
                "preference_set": settings.preference_set,
                **judge_accuracy(judgments),
            }
        )
    table = pd.DataFrame([{k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v) for k, v in row.items()} for row in rows])
    uri = evaluation_uri(store, config.name, iteration, JUDGE_ACCURACY)
    upstream = {f"judgments_{role}": uri for role, uri in judgments_uris.items()}
    info = _info(store, contract.EVAL_JUDGE_ACCURACY, config, None, upstream)
    write_artifact(store, uri, table.astype({"accuracy": "float64", "wrong_share": "float64", "tie_share": "float64"}), info)
    for row in rows:
        row["uri"] = uri
    return rows


def evaluate_checks(
    store: Store, config: RunConfig, iteration: int, win: dict[str, Any], accuracy: list[dict[str, Any]]
) -> tuple[str, str, list[CheckResult]]:
    """The post-evaluation checks (`metareward.checks`) on the win rate and the judge accuracies:
    writes `post_evaluation_checks` and returns its URI, its fingerprint and the results."""
    uri = evaluation_uri(store, config.name, iteration, POST_EVALUATION_CHECKS)
    upstream = {"win_rate": win["uris"][WIN_RATE], "judge_accuracy": accuracy[0]["uri"]}
    info = _info(store, contract.POST_EVALUATION_CHECKS, config, None, upstream)

    def compute() -> pd.DataFrame:
        return results_table(run_checks("post_evaluation", config.checks.thresholds, evaluation_figures(win, accuracy)))

    table = _stored_or_computed(store, uri, info, compute, refresh=False)
    return uri, info.fingerprint, read_results(table)
