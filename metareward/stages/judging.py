"""The judge's stages: N rubric judgments per response (sharded) with the per-response scores, and
the meta-judge's comparisons of pairs of judgments in both orders (sharded)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from metareward import contract, meta, parsing
from metareward.checkpoints import ModelRef
from metareward.contract import JudgeSettings, MetaJudgeSettings
from metareward.engines.base import Engine, EngineConfig, Sampling
from metareward.prompts import WINNER_OF_OPTION, render_judge_prompt, render_meta_judge_prompt
from metareward.schema import (
    COMPARISONS_COLUMNS,
    FINISH_REASON,
    JUDGMENT,
    JUDGMENT_A_ID,
    JUDGMENT_B_ID,
    JUDGMENT_ID,
    JUDGMENT_STATUSES,
    JUDGMENTS_COLUMNS,
    META_JUDGMENT,
    META_JUDGMENTS_COLUMNS,
    META_STATUSES,
    N_VALID,
    PROMPT,
    PROMPT_ID,
    RESPONSE,
    RESPONSE_ID,
    SCORE,
    STATUS,
    STATUS_FORCED,
    VALID_STATUSES,
    WINNER,
)
from metareward.scoring import response_scores
from metareward.stages.common import (
    ProgressCallback,
    artifact_uri,
    empty_table,
    read_tables,
    stage_info,
    user_turn,
    value_counts,
)
from metareward.stages.results import JUDGMENTS, META_JUDGMENTS, META_TARGETS, PROMPTS, RESPONSES, SCORES, JudgeResult, MetaJudgeResult
from metareward.stages.sharding import ShardRunner, run_shards, shard_prompt_ids, shard_seed
from metareward.stages.verdicts import force_failed_rows
from metareward.storage import Store, write_artifact
from metareward.summaries import JudgeSummary, MetaJudgeSummary


def judgment_id_of(response_id: str, sample: int) -> str:
    return f"{response_id}-j{sample}"


def _judge_shard(engine: Callable[[], Engine], settings: JudgeSettings, index: int, batch: pd.DataFrame) -> pd.DataFrame:
    """`judge.n` judgments of each of one shard's responses (`prompt_id`, `prompt`, `response_id`,
    `response`), scores parsed from the judgment text only, forced where that fails in `forced` mode."""
    if batch.empty:
        return empty_table(JUDGMENTS_COLUMNS, {SCORE: "float64"})
    judge = settings.judge
    conversations = [user_turn(render_judge_prompt(prompt, response)) for prompt, response in zip(batch[PROMPT], batch[RESPONSE])]
    sampling = Sampling(
        temperature=judge.temperature,
        top_p=judge.top_p,
        max_tokens=judge.max_tokens,
        seed=shard_seed(settings, "judge", index),
    )
    completions = engine().generate(conversations, sampling, n=judge.n)
    rows, row_conversations = [], []
    for (pid, rid), conversation, samples in zip(zip(batch[PROMPT_ID], batch[RESPONSE_ID]), conversations, completions):
        for sample, completion in enumerate(samples):
            rows.append((pid, rid, judgment_id_of(rid, sample), completion.text, completion.finish_reason))
            row_conversations.append(conversation)
    table = pd.DataFrame(rows, columns=[PROMPT_ID, RESPONSE_ID, JUDGMENT_ID, JUDGMENT, FINISH_REASON])
    parsed = parsing.parse_scores(table[JUDGMENT])
    table[SCORE] = parsed[SCORE].to_numpy(dtype=np.float64)
    table[STATUS] = parsed[STATUS].astype(str).to_numpy(dtype=object)
    if settings.verdict_mode == "forced":
        force_failed_rows(
            table, engine, row_conversations, text=JUDGMENT, verdict=SCORE, kind="score", verdict_of=float,
            temperature=judge.temperature, seed=shard_seed(settings, "judge", index, purpose="forced"),
        )
    return table[list(JUDGMENTS_COLUMNS)]


def judge(
    store: Store,
    run: str,
    settings: JudgeSettings,
    engine: EngineConfig,
    model: ModelRef,
    prompts_uri: str,
    responses_uri: str,
    progress: ProgressCallback | None = None,
    fresh: bool = False,
    runner: ShardRunner | None = None,
) -> JudgeResult:
    """The judge: `judge.n` judgments per response with the spec's rubric, scores parsed from the
    judgment text only (forced where parsing fails in `forced` mode). Writes `judgments` and the
    per-response `scores` table. `runner` computes the shards (None: in this process)."""
    tables = read_tables(store, {PROMPTS: prompts_uri, RESPONSES: responses_uri})
    prompts, responses = tables[PROMPTS], tables[RESPONSES]
    text_of = dict(zip(prompts[PROMPT_ID].astype(str), prompts[PROMPT]))
    shards = shard_prompt_ids(prompts, settings.shard_size)
    payloads = []
    for prompt_ids in shards:
        batch = responses[responses[PROMPT_ID].isin(prompt_ids)][[PROMPT_ID, RESPONSE_ID, RESPONSE]].reset_index(drop=True)
        payloads.append(batch.assign(**{PROMPT: [text_of[pid] for pid in batch[PROMPT_ID]]}))
    uri = artifact_uri(store, run, settings, JUDGMENTS)
    info = stage_info(store, contract.JUDGE, settings, model, {"prompts": prompts_uri, "responses": responses_uri})
    done = run_shards(store, "judge", _judge_shard, settings, engine, model, uri, payloads, info, [JUDGMENT_ID], progress, fresh, runner)
    judgments = done.table

    scores = response_scores(judgments)
    scores_uri = artifact_uri(store, run, settings, SCORES)
    write_artifact(store, scores_uri, scores, info.model_copy(update={"upstream": {**info.upstream, JUDGMENTS: uri}}))

    per_response = judgments.groupby(RESPONSE_ID).size()
    valid = judgments[STATUS].isin(VALID_STATUSES)
    summary = JudgeSummary(
        responses=len(responses),
        judgments=len(judgments),
        judgments_per_response={"min": int(per_response.min()), "max": int(per_response.max())} if len(per_response) else {},
        statuses=value_counts(judgments[STATUS], JUDGMENT_STATUSES),
        forced_fraction=float((judgments[STATUS] == STATUS_FORCED).mean()) if len(judgments) else 0.0,
        mean_score=float(judgments.loc[valid, SCORE].mean()) if valid.any() else None,
        responses_without_valid_score=int((scores[N_VALID] == 0).sum()),
        finish_reasons=value_counts(judgments[FINISH_REASON], ("stop", "length")),
        shards=len(shards),
        shards_computed=len(done.reports),
        execution=done.execution,
    )
    return JudgeResult(
        stage="judge", uri=uri, uris={JUDGMENTS: uri, SCORES: scores_uri}, key=done.manifest["fingerprint"], summary=summary
    )


def _meta_judge_shard(engine: Callable[[], Engine], settings: MetaJudgeSettings, index: int, batch: pd.DataFrame) -> pd.DataFrame:
    """One shard's planned comparisons (`COMPARISONS_COLUMNS` with the texts: `prompt`, `response`,
    `judgment_a`, `judgment_b`), each judged once, the winner parsed or forced in `forced` mode."""
    if batch.empty:
        return empty_table(META_JUDGMENTS_COLUMNS)
    meta_judge = settings.meta_judge
    conversations = [
        user_turn(render_meta_judge_prompt(prompt, response, judgment_a, judgment_b))
        for prompt, response, judgment_a, judgment_b in zip(batch[PROMPT], batch[RESPONSE], batch["judgment_a"], batch["judgment_b"])
    ]
    sampling = Sampling(
        temperature=meta_judge.temperature,
        top_p=meta_judge.top_p,
        max_tokens=meta_judge.max_tokens,
        seed=shard_seed(settings, "meta_judge", index),
    )
    completions = engine().generate(conversations, sampling, n=1)
    table = batch[list(COMPARISONS_COLUMNS)].copy()
    table[META_JUDGMENT] = [samples[0].text for samples in completions]
    parsed = parsing.parse_winners(table[META_JUDGMENT])
    table[WINNER] = parsed[WINNER].to_numpy(dtype=object)
    table[STATUS] = parsed[STATUS].astype(str).to_numpy(dtype=object)
    if settings.verdict_mode == "forced":
        force_failed_rows(
            table, engine, conversations, text=META_JUDGMENT, verdict=WINNER, kind="winner", verdict_of=WINNER_OF_OPTION.__getitem__,
            temperature=meta_judge.temperature, seed=shard_seed(settings, "meta_judge", index, purpose="forced"),
        )
    return table[list(META_JUDGMENTS_COLUMNS)]


def meta_judge(
    store: Store,
    run: str,
    settings: MetaJudgeSettings,
    engine: EngineConfig,
    model: ModelRef,
    prompts_uri: str,
    responses_uri: str,
    judgments_uri: str,
    progress: ProgressCallback | None = None,
    fresh: bool = False,
    runner: ShardRunner | None = None,
) -> MetaJudgeResult:
    """The meta-judge: per prompt, the response whose valid judgment scores vary most; every pair of
    its valid judgments compared in both orders (N(N-1) calls per prompt); the winner parsed, or
    forced in `forced` mode. Writes `meta_targets` and `meta_judgments`. Only run in iterations
    that train judge pairs (`pairs.train_judge_pairs`). `runner` computes the shards (None: in this
    process)."""
    upstream = {"prompts": prompts_uri, "responses": responses_uri, "judgments": judgments_uri}
    tables = read_tables(store, {PROMPTS: prompts_uri, RESPONSES: responses_uri, JUDGMENTS: judgments_uri})
    prompts, responses, judgments = tables[PROMPTS], tables[RESPONSES], tables[JUDGMENTS]
    info = stage_info(store, contract.META_JUDGE, settings, model, upstream)

    targets = meta.select_meta_targets(judgments, seed=settings.seed)
    target_drops = dict(targets.attrs.get("dropped", {}))
    targets_uri = artifact_uri(store, run, settings, META_TARGETS)
    write_artifact(store, targets_uri, targets, info)
    plan = meta.plan_comparisons(judgments, targets)

    prompt_text = dict(zip(prompts[PROMPT_ID].astype(str), prompts[PROMPT]))
    response_text = dict(zip(responses[RESPONSE_ID], responses[RESPONSE]))
    judgment_text = dict(zip(judgments[JUDGMENT_ID], judgments[JUDGMENT]))
    shards = shard_prompt_ids(prompts, settings.shard_size)
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

    uri = artifact_uri(store, run, settings, META_JUDGMENTS)
    info = info.model_copy(update={"upstream": {**info.upstream, META_TARGETS: targets_uri}})
    done = run_shards(
        store, "meta_judge", _meta_judge_shard, settings, engine, model, uri, payloads, info,
        [JUDGMENT_A_ID, JUDGMENT_B_ID], progress, fresh, runner,
    )
    meta_judgments = done.table
    winners = meta_judgments[WINNER]
    summary = MetaJudgeSummary(
        prompts=len(prompts),
        targets=len(targets),
        dropped=target_drops,
        comparisons=len(plan),
        meta_judgments=len(meta_judgments),
        statuses=value_counts(meta_judgments[STATUS], META_STATUSES),
        forced_fraction=float((meta_judgments[STATUS] == STATUS_FORCED).mean()) if len(meta_judgments) else 0.0,
        win_1st=int((winners == "A").sum()),
        win_2nd=int((winners == "B").sum()),
        shards=len(shards),
        shards_computed=len(done.reports),
        execution=done.execution,
    )
    return MetaJudgeResult(
        stage="meta_judge",
        uri=uri,
        uris={META_TARGETS: targets_uri, META_JUDGMENTS: uri},
        key=done.manifest["fingerprint"],
        summary=summary,
    )
