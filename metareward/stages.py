"""The stages of one Meta-Rewarding iteration as plain functions (no Prefect): the Prefect tasks wrap these.

Each stage takes small inputs (a `Store`, the iteration's effective `IterationConfig`, a `ModelRef`,
upstream artifact URIs), reads its inputs from storage, calls the core library, the engine or the
trainer, writes its Parquet artifact(s) itself and returns a `StageResult`: the artifact URI(s), the
artifact's key and a small JSON summary (counts, what was dropped and why). Never a DataFrame.

    sample_prompts  -> prompts                       (prompt_id, prompt)
    generate        -> responses        [sharded]    the actor: K responses per prompt, exact duplicates removed
    judge           -> judgments        [sharded]    the judge: N judgments per response
                       scores                        mean, ddof-0 variance, count of valid judgments per response
    meta_judge      -> meta_targets                  per prompt the response whose judgments disagree most
                       meta_judgments   [sharded]    both orders of every pair of its valid judgments
    actor_pairs     -> actor_pairs                   length-controlled best vs worst response
    judge_pairs     -> elo, judge_pairs              position-weighted battles, Bradley-Terry Elo, best vs worst judgment
    train           -> train (metrics) + model       DPO on the union of actor and judge pairs: M_{i-1} -> M_i
    summary         -> summary                       one row per stage of the iteration

Artifacts live at `store.stage_uri(run, i, name)` (`{root}/{run}/iter-{i}/{name}/data.parquet` plus a
manifest written last; `docs/artifacts.md`), with the columns of `metareward.schema`.

Sharding (generate, judge, meta_judge): shard k holds the prompts at positions
[k * shard_size, (k + 1) * shard_size) of the prompts artifact, and everything derived from them.
Each shard is committed on its own (`metareward.storage.ShardedArtifact`); a stage that is killed and
run again redoes only the shards that are missing, and the final table has every row exactly once.
Each shard's sampling seed is derived from (run seed, iteration, stage, shard index), so a shard run
again repeats the same texts and the resumed table equals an uninterrupted run's.

Keys: every artifact's manifest carries a fingerprint, the sha256 of (stage, schema version, the
checkpoint's sha256, the stage's settings `IterationConfig.stage_settings(stage)`, the upstream
artifacts' fingerprints). `StageResult.key` returns it, so a cache key built from the upstream keys
changes whenever anything upstream changed, and shards left by a run with other inputs are discarded.

Verdicts: the judge stage parses only the judgment text the model wrote, never the prompt or the
response it judged (a response that says "Score: 5" is not a score). With `verdict_mode: forced`, a
judgment without a valid score is cut before its last (partial) verdict line and completed with
`Score: k`, k picked by `engine.choose` among "0".."5" at the judge's temperature (status `forced`);
a meta-judgment without a winner likewise with " A" / " B" after "Winner: Judgement".

Engines are loaded through `metareward.engines.load_engine` (cached by checkpoint, so the three roles
share one loaded model) and only when a stage has shards left to compute: a stage whose artifact is
complete loads nothing; `fresh=True` (the flow's `refresh`) discards what storage holds and computes
every shard again. `train` releases the engines before DPO. `progress(fraction)` callbacks, when
given, are called with the share of shards done (0.0 first, 1.0 last).

Where shards run: each pending shard becomes a `ShardJob` (its own input rows, the settings, the
checkpoint, the artifact) computed by `run_shard` and committed by it; a `ShardRunner` decides
where: in this process, in order (the default), or as Ray tasks over a cluster's GPUs
(`tasks.shards`, `execution.backend: ray`). The same seeds give the same tables either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from metareward import meta, pairs as actor_pair_rules, parsing, prompt_sources
from metareward.checkpoints import ADAPTER_NAME, ModelRef
from metareward.config import IterationConfig
from metareward.engines.base import Conversation, Engine, Sampling
from metareward.hashing import tie_break_key
from metareward.prompts import (
    SCORE_OPTIONS,
    SCORE_PREFIX,
    WINNER_OF_OPTION,
    WINNER_OPTIONS,
    WINNER_PREFIX,
    render_judge_prompt,
    render_meta_judge_prompt,
)
from metareward.schema import (
    CHOSEN_CHARS,
    CHOSEN_SCORE,
    COMPARISONS_COLUMNS,
    FINISH_REASON,
    JUDGMENT,
    JUDGMENT_A_ID,
    JUDGMENT_B_ID,
    JUDGMENT_ID,
    JUDGMENT_STATUSES,
    JUDGMENTS_COLUMNS,
    KIND,
    KIND_ACTOR,
    KIND_JUDGE,
    META_JUDGMENT,
    META_JUDGMENTS_COLUMNS,
    META_STATUSES,
    N_TOKENS,
    N_VALID,
    PAIRS_COLUMNS,
    PROMPT,
    PROMPT_ID,
    PROMPTS_COLUMNS,
    REJECTED_CHARS,
    REJECTED_SCORE,
    RESPONSE,
    RESPONSE_ID,
    RESPONSES_COLUMNS,
    SCHEMA_VERSION,
    SCORE,
    SCORE_MEAN,
    STATUS,
    STATUS_FORCED,
    STATUS_OK,
    VALID_STATUSES,
    WINNER,
)
from metareward.scoring import response_scores
from metareward.storage import (
    ArtifactInfo,
    ShardedArtifact,
    StorageConfig,
    Store,
    read_artifact,
    read_manifest,
    write_artifact,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]

# Artifact names: the folder of each artifact under {root}/{run}/iter-{i}/ (docs/artifacts.md).
PROMPTS = "prompts"
RESPONSES = "responses"
JUDGMENTS = "judgments"
SCORES = "scores"
META_TARGETS = "meta_targets"
META_JUDGMENTS = "meta_judgments"
ACTOR_PAIRS = "actor_pairs"
ELO = "elo"
JUDGE_PAIRS = "judge_pairs"
TRAIN = "train"
SUMMARY = "summary"

# Sampling seeds are kept below 2**31: every backend (torch, numpy, vLLM) accepts them.
_SEED_MODULUS = 2**31


class StageResult(BaseModel):
    """What a stage returns: where its artifacts are, their key, and a small summary.

    stage: the stage's name (a key of `metareward.config.STAGE_SETTINGS`).
    uri: the stage's main artifact (None when it wrote none: `train` without pairs).
    uris: every artifact the stage wrote, by artifact name (judge: `judgments` and `scores`).
    key: the main artifact's fingerprint (see the module docstring); "" when there is none.
    summary: JSON values: counts, drops by reason, timings.
    model: the checkpoint `train` produced (M_i); None for every other stage and for a train stage
        that had no pairs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    uri: str | None
    uris: dict[str, str] = Field(default_factory=dict)
    key: str = ""
    summary: dict[str, Any] = Field(default_factory=dict)
    model: ModelRef | None = None


# ----------------------------------------------------------------------------------------------
# helpers


def artifact_uri(store: Store, config: IterationConfig, name: str) -> str:
    """`{root}/{run}/iter-{i}/{name}`: where the artifact `name` of this iteration lives."""
    return store.stage_uri(config.run, config.iteration, name)


def artifact_key(store: Store, uri: str) -> str:
    """The fingerprint of the complete artifact at `uri` (from its manifest)."""
    return str(read_manifest(store, uri)["fingerprint"])


def _fingerprint(stage: str, config: IterationConfig, checkpoint_sha256: str | None, upstream_keys: Mapping[str, str], part: str = "") -> str:
    payload = {
        "stage": stage,
        "artifact": part,
        "schema_version": SCHEMA_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "settings": config.stage_settings(stage),
        "upstream": dict(upstream_keys),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _artifact_info(
    stage: str,
    part: str,
    config: IterationConfig,
    model: ModelRef | None,
    upstream: Mapping[str, str],
    upstream_keys: Mapping[str, str],
) -> ArtifactInfo:
    sha256 = model.sha256 if model is not None else None
    return ArtifactInfo(
        stage=stage,
        schema_version=SCHEMA_VERSION,
        fingerprint=_fingerprint(stage, config, sha256, upstream_keys, part),
        checkpoint_sha256=sha256,
        config=config.stage_settings(stage),
        upstream=dict(upstream),
    )


def _read_inputs(store: Store, uris: Mapping[str, str]) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The tables of complete upstream artifacts and their keys, by role."""
    tables, keys = {}, {}
    for role, uri in uris.items():
        tables[role] = read_artifact(store, uri)
        keys[role] = artifact_key(store, uri)
    return tables, keys


def shard_seed(config: IterationConfig, stage: str, shard: int, purpose: str = "sample") -> int:
    """The sampling seed of one shard: a stable hash of (run seed, iteration, stage, purpose, shard)."""
    return tie_break_key(config.seed, f"iter-{config.iteration}/{stage}/{purpose}/shard-{shard}") % _SEED_MODULUS


def shard_prompt_ids(prompts: pd.DataFrame, shard_size: int) -> list[list[str]]:
    """The prompt ids of each shard, in the prompts artifact's order (at least one shard)."""
    ids = prompts[PROMPT_ID].astype(str).tolist()
    count = max(1, math.ceil(len(ids) / shard_size))
    return [ids[index * shard_size : (index + 1) * shard_size] for index in range(count)]


def _fs(store: Store):
    """The filesystem checkpoints are reached through: None (plain paths) for a local store."""
    return None if store.protocol == "file" else store.fs


class ShardJob(BaseModel):
    """One shard of a sharded stage, complete enough to be computed by another process or machine:
    the store to write to, the iteration's settings, the checkpoint, the artifact being built and the
    shard's own input rows (`payload`: only the rows this shard reads, so nothing else travels)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    stage: str
    storage: StorageConfig
    config: IterationConfig
    model: ModelRef
    uri: str
    shard_count: int
    info: ArtifactInfo
    index: int
    payload: pd.DataFrame


class ShardReport(BaseModel):
    """What computing one shard did: its rows and seconds, the process that computed it
    (`host:pid`) and whether that process loaded the engine for it (False: already loaded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    rows: int
    seconds: float
    worker: str
    engine_loaded: bool


# Runs the given shard jobs (each through `run_shard`, wherever it runs), calling `on_done` with
# each shard's report as it finishes; returns every report. None means in this process, in order.
ShardRunner = Callable[[Sequence[ShardJob], Callable[[ShardReport], None]], list[ShardReport]]


def run_shard(job: ShardJob) -> ShardReport:
    """Compute one shard with the engine for its checkpoint (loaded once per process, kept for the
    next shard) and commit it to its artifact. Called in the stage's process or a Ray worker."""
    from metareward.engines import engine_is_loaded, load_engine

    store = Store(job.storage)
    started = time.perf_counter()
    loaded_before = engine_is_loaded(job.config.engine, job.model)
    engine = _ShardEngine(lambda: load_engine(job.config.engine, job.model, fs=_fs(store)))
    table = _SHARD_FUNCTIONS[job.stage](engine, job.config, job.index, job.payload)
    seconds = time.perf_counter() - started
    artifact = ShardedArtifact(store, job.uri, job.shard_count, job.info)
    artifact.write_shard(job.index, table, seconds=seconds)
    logger.info("%s: shard %d of %d committed (%d rows)", job.uri, job.index + 1, job.shard_count, len(table))
    return ShardReport(
        index=job.index,
        rows=len(table),
        seconds=seconds,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        engine_loaded=engine.used and not loaded_before,
    )


class _ShardEngine:
    """The engine, loaded on first use only: a shard without rows loads no model."""

    def __init__(self, load: Callable[[], Engine]):
        self._load = load
        self._engine: Engine | None = None

    @property
    def used(self) -> bool:
        return self._engine is not None

    def __call__(self) -> Engine:
        if self._engine is None:
            self._engine = self._load()
        return self._engine


def run_shards_here(jobs: Sequence[ShardJob], on_done: Callable[[ShardReport], None]) -> list[ShardReport]:
    """The local `ShardRunner`: every shard in this process, in order."""
    reports = []
    for job in jobs:
        reports.append(run_shard(job))
        on_done(reports[-1])
    return reports


def _run_shards(
    store: Store,
    stage: str,
    config: IterationConfig,
    model: ModelRef,
    uri: str,
    payloads: Sequence[pd.DataFrame],
    info: ArtifactInfo,
    key_columns: Sequence[str],
    progress: ProgressCallback | None,
    fresh: bool,
    runner: ShardRunner | None,
) -> tuple[pd.DataFrame, dict[str, Any], list[ShardReport]]:
    """Write every pending shard (through `runner`; in this process when None), finalize, and
    return (table, manifest, the reports of the shards computed by this call). `fresh` discards
    what storage holds first."""
    artifact = ShardedArtifact(store, uri, len(payloads), info, fresh=fresh)
    pending = artifact.pending_shards()
    jobs = [
        ShardJob(
            stage=stage,
            storage=store.config.model_copy(update={"root": store.root}),  # absolute: workers have other cwds
            config=config,
            model=model,
            uri=uri,
            shard_count=len(payloads),
            info=info,
            index=index,
            payload=payloads[index],
        )
        for index in pending
    ]
    done = len(payloads) - len(pending)
    _report(progress, done, len(payloads))

    def on_done(report: ShardReport) -> None:
        nonlocal done
        done += 1
        _report(progress, done, len(payloads))

    reports = (runner or run_shards_here)(jobs, on_done) if jobs else []
    manifest = artifact.finalize(key_columns=list(key_columns))
    return artifact.read(), manifest, reports


def _execution_summary(reports: Sequence[ShardReport]) -> dict[str, Any]:
    """Where this call's shards ran: shards and engine loads per worker process."""
    workers: dict[str, dict[str, int]] = {}
    for report in reports:
        counts = workers.setdefault(report.worker, {"shards": 0, "engine_loads": 0})
        counts["shards"] += 1
        counts["engine_loads"] += int(report.engine_loaded)
    return {"workers": workers, "engine_loads": sum(counts["engine_loads"] for counts in workers.values())}


def _report(progress: ProgressCallback | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done / total if total else 1.0)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _counts(values: pd.Series, known: Sequence[str]) -> dict[str, int]:
    counted = Counter(values.astype(str))
    return {value: int(counted.get(value, 0)) for value in known} | {
        value: int(count) for value, count in counted.items() if value not in known
    }


def _empty(columns: Sequence[str], dtypes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A shard without rows, with the artifact's columns (text unless `dtypes` says otherwise)."""
    dtypes = dtypes or {}
    return pd.DataFrame({column: pd.Series(dtype=dtypes.get(column, "str")) for column in columns})


def _no_cap(cap: int) -> int | None:
    """Caps are 0 for "no cap" in the config, None in the core functions."""
    return cap if cap > 0 else None


# ----------------------------------------------------------------------------------------------
# sample_prompts


def sample_prompts(store: Store, config: IterationConfig) -> StageResult:
    """Iteration i's prompts from the configured pool (`prompts.source`), seeded and, by default,
    without replacement across iterations; the held-out slice is never sampled. Writes `prompts`."""
    stage = "sample_prompts"
    pool = prompt_sources.load_prompt_pool(config.prompts.source, store=store)
    sample = prompt_sources.sample_prompts(
        pool,
        iteration=config.iteration,
        per_iteration=config.prompts.per_iteration,
        seed=config.seed,
        holdout_fraction=config.prompts.holdout_fraction,
        without_replacement=config.prompts.without_replacement,
        earlier_sizes=config.earlier_prompts_per_iteration,
    )
    n_heldout = len(prompt_sources.heldout_prompts(pool, config.seed, config.prompts.holdout_fraction))
    # The pool's content is part of the key: the same source path with other prompts is another input.
    pool_digest = hashlib.sha256(
        "\n".join(f"{pid}\t{text}" for pid, text in zip(pool[PROMPT_ID], pool[PROMPT])).encode("utf-8")
    ).hexdigest()
    uri = artifact_uri(store, config, PROMPTS)
    info = _artifact_info(stage, PROMPTS, config, None, {}, {"pool": pool_digest})
    table = sample[list(PROMPTS_COLUMNS)].reset_index(drop=True)
    manifest = write_artifact(store, uri, table, info)
    summary = {
        "prompts": len(table),
        "pool": len(pool),
        "heldout": n_heldout,
        "pass": int(sample.attrs.get("pass", 0)),
        "source": config.prompts.source,
    }
    return StageResult(stage=stage, uri=uri, uris={PROMPTS: uri}, key=manifest["fingerprint"], summary=summary)


# ----------------------------------------------------------------------------------------------
# generate (the actor)


def response_id_of(iteration: int, prompt_id: str, sample: int) -> str:
    """A response id unique across the run: iteration, prompt and sample number."""
    return f"it{iteration}-{prompt_id}-r{sample}"


def _generate_shard(engine: Callable[[], Engine], config: IterationConfig, index: int, prompts: pd.DataFrame) -> pd.DataFrame:
    """The actor's responses for one shard's prompts (`prompt_id`, `prompt`)."""
    if prompts.empty:
        return _empty(RESPONSES_COLUMNS, {N_TOKENS: "int64"})
    actor = config.actor
    sampling = Sampling(
        temperature=actor.temperature,
        top_p=actor.top_p,
        max_tokens=actor.max_tokens,
        seed=shard_seed(config, "generate", index),
    )
    completions = engine().generate([_user(text) for text in prompts[PROMPT]], sampling, n=actor.k)
    rows = [
        (pid, response_id_of(config.iteration, pid, sample), completion.text, completion.n_tokens, completion.finish_reason)
        for pid, samples in zip(prompts[PROMPT_ID], completions)
        for sample, completion in enumerate(samples)
    ]
    table = pd.DataFrame(rows, columns=list(RESPONSES_COLUMNS)).astype({N_TOKENS: "int64"})
    if actor.dedup:
        table = actor_pair_rules.drop_duplicate_responses(table, seed=config.seed).reset_index(drop=True)
    return table


def generate(
    store: Store,
    config: IterationConfig,
    model: ModelRef,
    prompts_uri: str,
    progress: ProgressCallback | None = None,
    fresh: bool = False,
    runner: ShardRunner | None = None,
) -> StageResult:
    """The actor: `actor.k` responses per prompt, sampled per shard with a derived seed; exact
    duplicate responses to one prompt removed when `actor.dedup` (counted). Writes `responses`.
    `runner` computes the shards (None: in this process)."""
    stage = "generate"
    tables, keys = _read_inputs(store, {PROMPTS: prompts_uri})
    prompts = tables[PROMPTS]
    prompts = prompts.assign(**{PROMPT_ID: prompts[PROMPT_ID].astype(str)})
    shards = shard_prompt_ids(prompts, config.shard_size)
    payloads = [prompts[prompts[PROMPT_ID].isin(ids)][[PROMPT_ID, PROMPT]].reset_index(drop=True) for ids in shards]
    uri = artifact_uri(store, config, RESPONSES)
    info = _artifact_info(stage, RESPONSES, config, model, {PROMPTS: prompts_uri}, keys)
    responses, manifest, reports = _run_shards(
        store, stage, config, model, uri, payloads, info, [RESPONSE_ID], progress, fresh, runner
    )
    generated = len(prompts) * config.actor.k
    summary = {
        "prompts": len(prompts),
        "generated": generated,
        "responses": len(responses),
        "dropped": {"duplicate_text": generated - len(responses)},
        "finish_reasons": _counts(responses[FINISH_REASON], ("stop", "length")),
        "mean_response_chars": float(responses[RESPONSE].str.len().mean()) if len(responses) else None,
        "shards": len(shards),
        "shards_computed": len(reports),
        "execution": _execution_summary(reports),
    }
    return StageResult(stage=stage, uri=uri, uris={RESPONSES: uri}, key=manifest["fingerprint"], summary=summary)


# ----------------------------------------------------------------------------------------------
# judge


def judgment_id_of(response_id: str, sample: int) -> str:
    return f"{response_id}-j{sample}"


def force_verdicts(
    engine: Engine,
    conversations: Sequence[Conversation],
    texts: Sequence[str],
    kind: parsing.VerdictKind,
    temperature: float,
    seed: int,
    prefix: str | None = None,
    options: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(chosen option, completed text) for each failed verdict: the text cut before its last
    verdict line, continued with the verdict prefix and the model's own pick among the options.
    `prefix` and `options` default to the spec's (`Score: ` with "0".."5", `Winner: Judgement`
    with " A" / " B"); the evaluation passes its own comparison prompt's."""
    default_prefix, default_options = (SCORE_PREFIX, SCORE_OPTIONS) if kind == "score" else (WINNER_PREFIX, WINNER_OPTIONS)
    prefix = default_prefix if prefix is None else prefix
    options = default_options if options is None else options
    rationales = [parsing.cut_before_verdict(text, kind) for text in texts]
    continued = [
        [*conversation, {"role": "assistant", "content": rationale}]
        for conversation, rationale in zip(conversations, rationales)
    ]
    picked = [choice.option for choice in engine.choose(continued, prefix, options, temperature, seed=seed)]
    return picked, [rationale + prefix + option for rationale, option in zip(rationales, picked)]


def _judge_shard(engine: Callable[[], Engine], config: IterationConfig, index: int, batch: pd.DataFrame) -> pd.DataFrame:
    """`judge.n` judgments of each of one shard's responses (`prompt_id`, `prompt`, `response_id`,
    `response`), scores parsed from the judgment text only, forced where that fails in `forced` mode."""
    if batch.empty:
        return _empty(JUDGMENTS_COLUMNS, {SCORE: "float64"})
    settings = config.judge
    conversations = [_user(render_judge_prompt(prompt, response)) for prompt, response in zip(batch[PROMPT], batch[RESPONSE])]
    sampling = Sampling(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        seed=shard_seed(config, "judge", index),
    )
    completions = engine().generate(conversations, sampling, n=settings.n)
    rows, row_conversations = [], []
    for (pid, rid), conversation, samples in zip(zip(batch[PROMPT_ID], batch[RESPONSE_ID]), conversations, completions):
        for sample, completion in enumerate(samples):
            rows.append((pid, rid, judgment_id_of(rid, sample), completion.text, completion.finish_reason))
            row_conversations.append(conversation)
    table = pd.DataFrame(rows, columns=[PROMPT_ID, RESPONSE_ID, JUDGMENT_ID, JUDGMENT, FINISH_REASON])
    # Only the judge's own text is parsed: the prompt and the response are not in this column.
    parsed = parsing.parse_scores(table[JUDGMENT])
    table[SCORE] = parsed[SCORE].to_numpy(dtype=np.float64)
    table[STATUS] = parsed[STATUS].astype(str).to_numpy(dtype=object)
    if config.verdict_mode == "forced":
        failed = np.flatnonzero((table[STATUS] != STATUS_OK).to_numpy())
        if len(failed):
            options, texts = force_verdicts(
                engine(),
                [row_conversations[row] for row in failed],
                table[JUDGMENT].to_numpy()[failed].tolist(),
                "score",
                settings.temperature,
                shard_seed(config, "judge", index, purpose="forced"),
            )
            table.loc[failed, JUDGMENT] = texts
            table.loc[failed, SCORE] = [float(option) for option in options]
            table.loc[failed, STATUS] = STATUS_FORCED
    return table[list(JUDGMENTS_COLUMNS)]


def judge(
    store: Store,
    config: IterationConfig,
    model: ModelRef,
    prompts_uri: str,
    responses_uri: str,
    progress: ProgressCallback | None = None,
    fresh: bool = False,
    runner: ShardRunner | None = None,
) -> StageResult:
    """The judge: `judge.n` judgments per response with the spec's rubric, scores parsed from the
    judgment text only (forced where parsing fails in `forced` mode). Writes `judgments` and the
    per-response `scores` table. `runner` computes the shards (None: in this process)."""
    stage = "judge"
    tables, keys = _read_inputs(store, {PROMPTS: prompts_uri, RESPONSES: responses_uri})
    prompts, responses = tables[PROMPTS], tables[RESPONSES]
    text_of = dict(zip(prompts[PROMPT_ID].astype(str), prompts[PROMPT]))
    shards = shard_prompt_ids(prompts, config.shard_size)
    payloads = []
    for prompt_ids in shards:
        batch = responses[responses[PROMPT_ID].isin(prompt_ids)][[PROMPT_ID, RESPONSE_ID, RESPONSE]].reset_index(drop=True)
        payloads.append(batch.assign(**{PROMPT: [text_of[pid] for pid in batch[PROMPT_ID]]}))
    uri = artifact_uri(store, config, JUDGMENTS)
    upstream = {PROMPTS: prompts_uri, RESPONSES: responses_uri}
    info = _artifact_info(stage, JUDGMENTS, config, model, upstream, keys)
    judgments, manifest, reports = _run_shards(
        store, stage, config, model, uri, payloads, info, [JUDGMENT_ID], progress, fresh, runner
    )

    scores = response_scores(judgments)
    scores_uri = artifact_uri(store, config, SCORES)
    scores_info = _artifact_info(stage, SCORES, config, model, {JUDGMENTS: uri}, {JUDGMENTS: manifest["fingerprint"]})
    write_artifact(store, scores_uri, scores, scores_info)

    per_response = judgments.groupby(RESPONSE_ID).size()
    valid = judgments[STATUS].isin(VALID_STATUSES)
    summary = {
        "responses": len(responses),
        "judgments": len(judgments),
        "judgments_per_response": {"min": int(per_response.min()), "max": int(per_response.max())} if len(per_response) else {},
        "statuses": _counts(judgments[STATUS], JUDGMENT_STATUSES),
        "forced_fraction": float((judgments[STATUS] == STATUS_FORCED).mean()) if len(judgments) else 0.0,
        "mean_score": float(judgments.loc[valid, SCORE].mean()) if valid.any() else None,
        "responses_without_valid_score": int((scores[N_VALID] == 0).sum()),
        "finish_reasons": _counts(judgments[FINISH_REASON], ("stop", "length")),
        "shards": len(shards),
        "shards_computed": len(reports),
        "execution": _execution_summary(reports),
    }
    return StageResult(
        stage=stage, uri=uri, uris={JUDGMENTS: uri, SCORES: scores_uri}, key=manifest["fingerprint"], summary=summary
    )


# ----------------------------------------------------------------------------------------------
# meta_judge


def _meta_judge_shard(engine: Callable[[], Engine], config: IterationConfig, index: int, batch: pd.DataFrame) -> pd.DataFrame:
    """One shard's planned comparisons (`COMPARISONS_COLUMNS` with the texts: `prompt`, `response`,
    `judgment_a`, `judgment_b`), each judged once, the winner parsed or forced in `forced` mode."""
    if batch.empty:
        return _empty(META_JUDGMENTS_COLUMNS)
    settings = config.meta_judge
    conversations = [
        _user(render_meta_judge_prompt(prompt, response, judgment_a, judgment_b))
        for prompt, response, judgment_a, judgment_b in zip(batch[PROMPT], batch[RESPONSE], batch["judgment_a"], batch["judgment_b"])
    ]
    sampling = Sampling(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        seed=shard_seed(config, "meta_judge", index),
    )
    completions = engine().generate(conversations, sampling, n=1)
    table = batch[list(COMPARISONS_COLUMNS)].copy()
    table[META_JUDGMENT] = [samples[0].text for samples in completions]
    parsed = parsing.parse_winners(table[META_JUDGMENT])
    table[WINNER] = parsed[WINNER].to_numpy(dtype=object)
    table[STATUS] = parsed[STATUS].astype(str).to_numpy(dtype=object)
    if config.verdict_mode == "forced":
        failed = np.flatnonzero((table[STATUS] != STATUS_OK).to_numpy())
        if len(failed):
            options, texts = force_verdicts(
                engine(),
                [conversations[row] for row in failed],
                table[META_JUDGMENT].to_numpy()[failed].tolist(),
                "winner",
                settings.temperature,
                shard_seed(config, "meta_judge", index, purpose="forced"),
            )
            table.loc[failed, META_JUDGMENT] = texts
            table.loc[failed, WINNER] = [WINNER_OF_OPTION[option] for option in options]
            table.loc[failed, STATUS] = STATUS_FORCED
    return table[list(META_JUDGMENTS_COLUMNS)]


def meta_judge(
    store: Store,
    config: IterationConfig,
    model: ModelRef,
    prompts_uri: str,
    responses_uri: str,
    judgments_uri: str,
    progress: ProgressCallback | None = None,
    fresh: bool = False,
    runner: ShardRunner | None = None,
) -> StageResult:
    """The meta-judge: per prompt, the response whose valid judgment scores vary most; every pair of
    its valid judgments compared in both orders (N(N-1) calls per prompt); the winner parsed, or
    forced in `forced` mode. Writes `meta_targets` and `meta_judgments`. Only run in iterations
    that train judge pairs (`pairs.train_judge_pairs`). `runner` computes the shards (None: in this
    process)."""
    stage = "meta_judge"
    upstream = {PROMPTS: prompts_uri, RESPONSES: responses_uri, JUDGMENTS: judgments_uri}
    tables, keys = _read_inputs(store, upstream)
    prompts, responses, judgments = tables[PROMPTS], tables[RESPONSES], tables[JUDGMENTS]

    targets = meta.select_meta_targets(judgments, seed=config.seed)
    target_drops = dict(targets.attrs.get("dropped", {}))
    targets_uri = artifact_uri(store, config, META_TARGETS)
    targets_info = _artifact_info(stage, META_TARGETS, config, model, upstream, keys)
    write_artifact(store, targets_uri, targets, targets_info)
    plan = meta.plan_comparisons(judgments, targets)

    prompt_text = dict(zip(prompts[PROMPT_ID].astype(str), prompts[PROMPT]))
    response_text = dict(zip(responses[RESPONSE_ID], responses[RESPONSE]))
    judgment_text = dict(zip(judgments[JUDGMENT_ID], judgments[JUDGMENT]))
    shards = shard_prompt_ids(prompts, config.shard_size)
    payloads = []
    for prompt_ids in shards:
        batch = plan[plan[PROMPT_ID].isin(prompt_ids)].reset_index(drop=True)
        payloads.append(
            batch.assign(
                **{
                    PROMPT: [prompt_text[pid] for pid in batch[PROMPT_ID]],
                    RESPONSE: [response_text[rid] for rid in batch[RESPONSE_ID]],
                    "judgment_a": [judgment_text[a] for a in batch[JUDGMENT_A_ID]],
                    "judgment_b": [judgment_text[b] for b in batch[JUDGMENT_B_ID]],
                }
            )
        )

    uri = artifact_uri(store, config, META_JUDGMENTS)
    info = _artifact_info(
        stage, META_JUDGMENTS, config, model, {**upstream, META_TARGETS: targets_uri}, {**keys, META_TARGETS: targets_info.fingerprint}
    )
    meta_judgments, manifest, reports = _run_shards(
        store, stage, config, model, uri, payloads, info, [JUDGMENT_A_ID, JUDGMENT_B_ID], progress, fresh, runner
    )
    winners = meta_judgments[WINNER]
    summary = {
        "prompts": len(prompts),
        "targets": len(targets),
        "dropped": target_drops,
        "comparisons": len(plan),
        "meta_judgments": len(meta_judgments),
        "statuses": _counts(meta_judgments[STATUS], META_STATUSES),
        "forced_fraction": float((meta_judgments[STATUS] == STATUS_FORCED).mean()) if len(meta_judgments) else 0.0,
        "win_1st": int((winners == "A").sum()),
        "win_2nd": int((winners == "B").sum()),
        "shards": len(shards),
        "shards_computed": len(reports),
        "execution": _execution_summary(reports),
    }
    return StageResult(
        stage=stage,
        uri=uri,
        uris={META_TARGETS: targets_uri, META_JUDGMENTS: uri},
        key=manifest["fingerprint"],
        summary=summary,
    )


# ----------------------------------------------------------------------------------------------
# pairs


def actor_pairs(store: Store, config: IterationConfig, prompts_uri: str, responses_uri: str, scores_uri: str) -> StageResult:
    """Length-controlled actor pairs (rho, `pairs.length_measure`, `pairs.max_chosen_chars`) from the
    responses' mean scores. Writes `actor_pairs`; drops counted by reason."""
    stage = "actor_pairs"
    upstream = {PROMPTS: prompts_uri, RESPONSES: responses_uri, SCORES: scores_uri}
    tables, keys = _read_inputs(store, upstream)
    scores = tables[SCORES].set_index(RESPONSE_ID)[SCORE_MEAN]
    responses = tables[RESPONSES].assign(**{SCORE: lambda table: table[RESPONSE_ID].map(scores).astype("float64")})
    selected = actor_pair_rules.select_actor_pairs(
        responses,
        config.pairs.rho,
        max_chosen_chars=_no_cap(config.pairs.max_chosen_chars),
        length=config.pairs.length_measure,
        prompts=tables[PROMPTS],
        seed=config.seed,
    )
    uri = artifact_uri(store, config, ACTOR_PAIRS)
    manifest = write_artifact(store, uri, selected, _artifact_info(stage, ACTOR_PAIRS, config, None, upstream, keys))
    summary = {
        "prompts": int(tables[RESPONSES][PROMPT_ID].nunique()),
        "pairs": len(selected),
        "dropped": dict(selected.attrs.get("dropped", {})),
        "rho": config.pairs.rho,
        "mean_chosen_chars": float(selected[CHOSEN_CHARS].mean()) if len(selected) else None,
        "mean_rejected_chars": float(selected[REJECTED_CHARS].mean()) if len(selected) else None,
    }
    return StageResult(stage=stage, uri=uri, uris={ACTOR_PAIRS: uri}, key=manifest["fingerprint"], summary=summary)


def judge_pairs(
    store: Store,
    config: IterationConfig,
    prompts_uri: str,
    responses_uri: str,
    judgments_uri: str,
    meta_targets_uri: str,
    meta_judgments_uri: str,
) -> StageResult:
    """Judge pairs from the meta-judgments: positional weights over the iteration, battle matrices,
    Bradley-Terry Elo, highest vs lowest Elo judgment with the caps and filters of `pairs`. Writes
    `elo` and `judge_pairs`; drops counted by reason."""
    stage = "judge_pairs"
    upstream = {
        PROMPTS: prompts_uri,
        RESPONSES: responses_uri,
        JUDGMENTS: judgments_uri,
        META_TARGETS: meta_targets_uri,
        META_JUDGMENTS: meta_judgments_uri,
    }
    tables, keys = _read_inputs(store, upstream)
    meta_judgments = tables[META_JUDGMENTS]
    w1, w2 = meta.positional_weights(meta_judgments)
    elo = meta.judgment_elo(meta_judgments, w1, w2, l2=config.pairs.elo_l2)
    selected = meta.select_judge_pairs(
        elo,
        targets=tables[META_TARGETS],
        judgments=tables[JUDGMENTS],
        responses=tables[RESPONSES],
        prompts=tables[PROMPTS],
        max_chosen_chars=_no_cap(config.pairs.max_chosen_judgment_chars),
        require_distinct_scores=config.pairs.require_distinct_judge_scores,
        elo_tolerance=config.pairs.elo_tie_tolerance,
        seed=config.seed,
    )
    elo_uri = artifact_uri(store, config, ELO)
    write_artifact(store, elo_uri, elo, _artifact_info(stage, ELO, config, None, upstream, keys))
    uri = artifact_uri(store, config, JUDGE_PAIRS)
    manifest = write_artifact(store, uri, selected, _artifact_info(stage, JUDGE_PAIRS, config, None, upstream, keys))
    summary = {
        "targets": len(tables[META_TARGETS]),
        "pairs": len(selected),
        "dropped": dict(selected.attrs.get("dropped", {})),
        "w1": w1,
        "w2": w2,
        "judgments_with_elo": len(elo),
        "chosen_score_higher": int((selected[CHOSEN_SCORE] > selected[REJECTED_SCORE]).sum()),
        "chosen_longer": int((selected[CHOSEN_CHARS] > selected[REJECTED_CHARS]).sum()),
    }
    return StageResult(stage=stage, uri=uri, uris={ELO: elo_uri, JUDGE_PAIRS: uri}, key=manifest["fingerprint"], summary=summary)


# ----------------------------------------------------------------------------------------------
# train

# Folders of the train stage under {root}/{run}/iter-{i}/ besides `model` (M_i): the LoRA adapter
# (a checkpoint a vLLM engine serves as a LoRA) and the trainer checkpoints a killed stage resumes from.
ADAPTER = ADAPTER_NAME
TRAIN_STATE = "train_state"


def train(
    store: Store,
    config: IterationConfig,
    model: ModelRef,
    actor_pairs_uri: str,
    judge_pairs_uri: str | None = None,
    progress: ProgressCallback | None = None,
) -> StageResult:
    """DPO on the union of the iteration's actor pairs and judge pairs (`judge_pairs_uri` None when
    the iteration trains none), reference = `model` (M_{i-1}); M_i is saved at
    `store.checkpoint_uri(run, i)` and returned in `StageResult.model`, the training metrics in the
    `train` artifact. Judge pairs are mixed in by `training.max_judge_pairs` / `judge_pairs_ratio`
    (counts in `summary["mixing"]`). With LoRA the adapter is saved at `{iteration}/adapter`
    (`summary["adapter"]`); with `training.save_steps` trainer checkpoints go to
    `{iteration}/train_state` and a re-run after a kill resumes from the newest
    (`summary["resumed_from_step"]`); the state is removed once M_i is saved. With
    `training.launcher: ray_train` the DPO workers run on the Ray cluster of `execution.ray`. With
    no pairs at all, or none left after the training input rules (`metareward.training`), nothing is
    trained: the result has `model=None` and `summary["message"]` says why; the caller stops the
    run there."""
    stage = "train"
    upstream = {ACTOR_PAIRS: actor_pairs_uri} | ({JUDGE_PAIRS: judge_pairs_uri} if judge_pairs_uri else {})
    tables, keys = _read_inputs(store, upstream)
    union = pd.concat([tables[name] for name in upstream], ignore_index=True)
    by_kind = {kind: int((union[KIND] == kind).sum()) for kind in (KIND_ACTOR, KIND_JUDGE)}
    if union.empty:
        message = (
            f"iteration {config.iteration} has no preference pairs (actor: 0, judge: "
            f"{'0' if judge_pairs_uri else 'not trained'}), so there is nothing to train M{config.iteration} on; "
            "the run stops here. The actor_pairs and judge_pairs summaries say why each prompt gave no pair."
        )
        logger.warning(message)
        _report(progress, 1, 1)
        return StageResult(stage=stage, uri=None, summary={"trained": False, "pairs": 0, "pairs_by_kind": by_kind, "message": message})

    from metareward.engines import release_engines
    from metareward.training import NoTrainablePairs, train_dpo

    _report(progress, 0, 1)
    # DPO holds the policy, the reference and the optimizer: the serving copy must go first.
    release_engines()
    try:
        result = train_dpo(
            union[list(PAIRS_COLUMNS)],
            base=model,
            output_uri=store.checkpoint_uri(config.run, config.iteration),
            config=config.training,
            fs=_fs(store),
            adapter_uri=artifact_uri(store, config, ADAPTER),
            state_uri=artifact_uri(store, config, TRAIN_STATE),
            ray=config.execution.ray,
        )
    except NoTrainablePairs as error:
        message = (
            f"iteration {config.iteration} has {len(union)} preference pairs but the training input rules "
            f"dropped every one (by reason: {error.dropped}; see training.max_length and training.long_pairs), "
            f"so there is nothing to train M{config.iteration} on; the run stops here."
        )
        logger.warning(message)
        _report(progress, 1, 1)
        summary = {"trained": False, "pairs": len(union), "pairs_by_kind": by_kind, "dropped": error.dropped, "message": message}
        return StageResult(stage=stage, uri=None, summary=summary)
    uri = artifact_uri(store, config, TRAIN)
    manifest = write_artifact(store, uri, result.metrics, _artifact_info(stage, TRAIN, config, model, upstream, keys))
    _report(progress, 1, 1)
    last = result.metrics.iloc[-1].to_dict() if len(result.metrics) else {}
    summary = {
        "trained": True,
        "pairs": len(union),
        "pairs_by_kind": by_kind,
        "pairs_used": result.n_pairs_used,
        "pairs_used_by_kind": dict(result.n_pairs_used_by_kind),
        "dropped": dict(result.n_pairs_dropped),
        "truncated": result.n_pairs_truncated,
        "mixing": dict(result.mixing),
        "steps": result.n_steps,
        "resumed_from_step": result.resumed_from_step,
        "processes": result.num_processes,
        "precision": result.precision,
        "train_seconds": result.train_seconds,
        "final_loss": float(last["loss"]) if "loss" in last else None,
        "checkpoint": result.model.uri,
        "checkpoint_sha256": result.model.sha256,
        "adapter": result.adapter.uri if result.adapter is not None else None,
        "adapter_sha256": result.adapter.sha256 if result.adapter is not None else None,
    }
    return StageResult(stage=stage, uri=uri, uris={TRAIN: uri}, key=manifest["fingerprint"], summary=summary, model=result.model)


# ----------------------------------------------------------------------------------------------
# summary


def summary(store: Store, config: IterationConfig, model: ModelRef, results: Sequence[StageResult]) -> StageResult:
    """The iteration at a glance: one row per stage (stage, artifact URI, rows, work seconds, the
    stage's summary as JSON) in `summary`, and the key metrics in the returned summary."""
    stage = "summary"
    rows, keys = [], {}
    for result in results:
        rows_written, seconds = None, None
        if result.uri is not None:
            manifest = read_manifest(store, result.uri)
            rows_written = int(manifest["rows"])
            timings = manifest.get("timings", {})
            seconds = timings.get("work_seconds", timings.get("write_seconds"))
            keys[result.stage] = result.key
        rows.append(
            {
                "stage": result.stage,
                "uri": result.uri or "",
                "rows": rows_written,
                "seconds": seconds,
                "summary": json.dumps(result.summary, sort_keys=True, default=str),
            }
        )
    table = pd.DataFrame(rows, columns=["stage", "uri", "rows", "seconds", "summary"]).astype({"rows": "Int64", "seconds": "float64"})
    uri = artifact_uri(store, config, SUMMARY)
    manifest = write_artifact(store, uri, table, _artifact_info(stage, SUMMARY, config, model, {}, keys))
    by_stage = {result.stage: result.summary for result in results}
    trained = by_stage.get("train", {})
    overview = {
        "iteration": config.iteration,
        "base_checkpoint_sha256": model.sha256,
        "prompts": by_stage.get("sample_prompts", {}).get("prompts"),
        "responses": by_stage.get("generate", {}).get("responses"),
        "duplicates_removed": by_stage.get("generate", {}).get("dropped", {}).get("duplicate_text"),
        "judgments": by_stage.get("judge", {}).get("judgments"),
        "judgments_forced": by_stage.get("judge", {}).get("statuses", {}).get(STATUS_FORCED),
        "mean_score": by_stage.get("judge", {}).get("mean_score"),
        "meta_judgments": by_stage.get("meta_judge", {}).get("meta_judgments"),
        "meta_judgments_forced": by_stage.get("meta_judge", {}).get("statuses", {}).get(STATUS_FORCED),
        "actor_pairs": by_stage.get("actor_pairs", {}).get("pairs"),
        "judge_pairs": by_stage.get("judge_pairs", {}).get("pairs"),
        "trained": bool(trained.get("trained", False)),
        "checkpoint_sha256": trained.get("checkpoint_sha256"),
        "final_loss": trained.get("final_loss"),
    }
    return StageResult(stage=stage, uri=uri, uris={SUMMARY: uri}, key=manifest["fingerprint"], summary=overview)


# The shard computations of the sharded stages, by stage name (`run_shard` dispatches on it).
_SHARD_FUNCTIONS: dict[str, Callable[[Callable[[], Engine], IterationConfig, int, pd.DataFrame], pd.DataFrame]] = {
    "generate": _generate_shard,
    "judge": _judge_shard,
    "meta_judge": _meta_judge_shard,
}
