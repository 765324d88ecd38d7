"""The actor's stages: sample the iteration's prompts, then K responses per prompt (sharded)."""

from __future__ import annotations

from typing import Callable

import pandas as pd

from metareward import contract, pairs as actor_pair_rules, prompt_sources
from metareward.checkpoints import ModelRef
from metareward.contract import GenerateSettings, SamplePromptsSettings
from metareward.engines.base import Engine, EngineConfig, Sampling
from metareward.schema import FINISH_REASON, N_TOKENS, PROMPT, PROMPT_ID, PROMPTS_COLUMNS, RESPONSE, RESPONSE_ID, RESPONSES_COLUMNS
from metareward.stages.common import (
    ProgressCallback,
    artifact_uri,
    empty_table,
    read_tables,
    stage_info,
    user_turn,
    value_counts,
)
from metareward.stages.results import PROMPTS, RESPONSES, GenerateResult, SamplePromptsResult
from metareward.stages.sharding import ShardRunner, run_shards, shard_prompt_ids, shard_seed
from metareward.storage import Store, write_artifact
from metareward.summaries import GenerateSummary, SamplePromptsSummary


def sample_prompts(store: Store, run: str, settings: SamplePromptsSettings) -> SamplePromptsResult:
    """Iteration i's prompts from the configured pool (`prompts.source`), seeded and, by default,
    without replacement across iterations; the held-out slice is never sampled. Writes `prompts`."""
    prompts = settings.prompts
    pool = prompt_sources.load_prompt_pool(prompts.source, store=store)
    sample = prompt_sources.sample_prompts(
        pool,
        iteration=settings.iteration,
        per_iteration=prompts.per_iteration,
        seed=settings.seed,
        holdout_fraction=prompts.holdout_fraction,
        without_replacement=prompts.without_replacement,
        earlier_sizes=settings.earlier_prompts_per_iteration,
    )
    n_heldout = len(prompt_sources.heldout_prompts(pool, settings.seed, prompts.holdout_fraction))
    uri = artifact_uri(store, run, settings, PROMPTS)
    info = stage_info(store, contract.SAMPLE_PROMPTS, settings, None, {})
    table = sample[list(PROMPTS_COLUMNS)].reset_index(drop=True)
    manifest = write_artifact(store, uri, table, info)
    summary = SamplePromptsSummary(
        prompts=len(table),
        pool=len(pool),
        heldout=n_heldout,
        sample_pass=int(sample.attrs.get("pass", 0)),
        source=prompts.source,
    )
    return SamplePromptsResult(stage="sample_prompts", uri=uri, uris={PROMPTS: uri}, key=manifest["fingerprint"], summary=summary)


def response_id_of(iteration: int, prompt_id: str, sample: int) -> str:
    """A response id unique across the run: iteration, prompt and sample number."""
    return f"it{iteration}-{prompt_id}-r{sample}"


def _generate_shard(engine: Callable[[], Engine], settings: GenerateSettings, index: int, prompts: pd.DataFrame) -> pd.DataFrame:
    """The actor's responses for one shard's prompts (`prompt_id`, `prompt`)."""
    if prompts.empty:
        return empty_table(RESPONSES_COLUMNS, {N_TOKENS: "int64"})
    actor = settings.actor
    sampling = Sampling(
        temperature=actor.temperature,
        top_p=actor.top_p,
        max_tokens=actor.max_tokens,
        seed=shard_seed(settings, "generate", index),
    )
    completions = engine().generate([user_turn(text) for text in prompts[PROMPT]], sampling, n=actor.k)
    rows = [
        (pid, response_id_of(settings.iteration, pid, sample), completion.text, completion.n_tokens, completion.finish_reason)
        for pid, samples in zip(prompts[PROMPT_ID], completions)
        for sample, completion in enumerate(samples)
    ]
    table = pd.DataFrame(rows, columns=list(RESPONSES_COLUMNS)).astype({N_TOKENS: "int64"})
    if actor.dedup:
        table = actor_pair_rules.drop_duplicate_responses(table, seed=settings.seed).reset_index(drop=True)
    return table


def generate(
    store: Store,
    run: str,
    settings: GenerateSettings,
    engine: EngineConfig,
    model: ModelRef,
    prompts_uri: str,
    progress: ProgressCallback | None = None,
    fresh: bool = False,
    runner: ShardRunner | None = None,
) -> GenerateResult:
    """The actor: `actor.k` responses per prompt, sampled per shard with a derived seed; exact
    duplicate responses to one prompt removed when `actor.dedup` (counted). Writes `responses`.
    `engine` says how to load the model; `runner` computes the shards (None: in this process)."""
    prompts = read_tables(store, {PROMPTS: prompts_uri})[PROMPTS]
    prompts = prompts.assign(**{PROMPT_ID: prompts[PROMPT_ID].astype(str)})
    shards = shard_prompt_ids(prompts, settings.shard_size)
    payloads = [prompts[prompts[PROMPT_ID].isin(ids)][[PROMPT_ID, PROMPT]].reset_index(drop=True) for ids in shards]
    uri = artifact_uri(store, run, settings, RESPONSES)
    info = stage_info(store, contract.GENERATE, settings, model, {"prompts": prompts_uri})
    done = run_shards(
        store, "generate", _generate_shard, settings, engine, model, uri, payloads, info, [RESPONSE_ID], progress, fresh, runner
    )
    responses = done.table
    generated = len(prompts) * settings.actor.k
    summary = GenerateSummary(
        prompts=len(prompts),
        generated=generated,
        responses=len(responses),
        dropped={"duplicate_text": generated - len(responses)},
        finish_reasons=value_counts(responses[FINISH_REASON], ("stop", "length")),
        mean_response_chars=float(responses[RESPONSE].str.len().mean()) if len(responses) else None,
        shards=len(shards),
        shards_computed=len(done.reports),
        execution=done.execution,
    )
    return GenerateResult(stage="generate", uri=uri, uris={RESPONSES: uri}, key=done.manifest["fingerprint"], summary=summary)
