"""The stages of one Meta-Rewarding iteration as plain functions (no Prefect): the Prefect tasks
(`tasks.stages`) wrap these.

Each stage function takes the store, the run's name, its own settings model (declared in
`metareward.contract`, projected from the iteration's config: the only settings it can read, so
what it reads is what its fingerprint covers), the checkpoint and the upstream artifact URIs; the
sharded and training stages also take how to run (the engine config to load the model with, where
shards run, a progress callback) — none of which changes what they compute. Each reads its inputs
from storage, calls the core library, the engine or the trainer, writes its Parquet artifact(s)
itself and returns its typed `StageResult` (artifact URIs, the fingerprint, a typed summary from
`metareward.summaries`). Never a DataFrame.

    sample_prompts  -> prompts                       (prompt_id, prompt)
    generate        -> responses        [sharded]    the actor: K responses per prompt, exact duplicates removed
    judge           -> judgments        [sharded]    the judge: N judgments per response
                       scores                        mean, ddof-0 variance, count of valid judgments per response
    meta_judge      -> meta_targets                  per prompt the response whose judgments disagree most
                       meta_judgments   [sharded]    both orders of every pair of its valid judgments
    actor_pairs     -> actor_pairs                   length-controlled best vs worst response
    judge_pairs     -> elo, judge_pairs              position-weighted battles, Bradley-Terry Elo, best vs worst judgment
    pre_train_checks -> pre_train_checks             the judge-health checks before training (`metareward.checks`)
    train           -> train (metrics) + model       DPO on the union of actor and judge pairs: M_{i-1} -> M_i
    summary         -> summary                       one row per stage of the iteration, and the iteration's own

Artifacts live at `store.stage_uri(run, i, name)` (`{root}/{run}/iter-{i}/{name}/data.parquet` plus a
manifest written last; `docs/artifacts.md`), with the columns of `metareward.schema`.

Modules: `actor` (sample_prompts, generate), `judging` (judge, meta_judge), `selection`
(actor_pairs, judge_pairs), `train` (train, summary), `sharding` (shard plans and seeds, where
shards run), `verdicts` (forced verdicts), `common` (fingerprints, artifact info, table helpers),
`results` (the typed results and the artifact names).

Keys: `common.stage_fingerprint` computes a stage's one fingerprint from its declaration; every
artifact the stage writes carries it in its manifest, `StageResult.key` returns it, the Prefect
cache key is made of it (`tasks.cache`), and shards or a finished artifact left under another
fingerprint (other inputs, another pipeline version) are discarded instead of reused.

Engines are loaded through `metareward.engines.load_engine` (cached by checkpoint, so the three roles
share one loaded model) and only when a stage has shards left to compute: a stage whose artifact is
complete loads nothing; `fresh=True` (the flow's `refresh`) discards what storage holds and computes
every shard again. `train` releases the engines before DPO.
"""

from metareward.stages.actor import generate, response_id_of, sample_prompts
from metareward.stages.checks import pre_train_checks
from metareward.stages.common import stage_fingerprint
from metareward.stages.judging import judge, judgment_id_of, meta_judge
from metareward.stages.results import (
    ACTOR_PAIRS,
    ADAPTER,
    ELO,
    JUDGE_PAIRS,
    JUDGMENTS,
    META_JUDGMENTS,
    META_TARGETS,
    PRE_TRAIN_CHECKS,
    PROMPTS,
    RESPONSES,
    SCORES,
    SUMMARY,
    TRAIN,
    TRAIN_STATE,
    ActorPairsResult,
    ChecksResult,
    GenerateResult,
    JudgePairsResult,
    JudgeResult,
    MetaJudgeResult,
    SamplePromptsResult,
    StageResult,
    SummaryResult,
    TrainResult,
)
from metareward.stages.selection import actor_pairs, judge_pairs
from metareward.stages.sharding import ShardJob, ShardReport, ShardRunner, run_shard, shard_prompt_ids, shard_seed
from metareward.stages.train import read_summaries, stored_summary, summary, summary_keys, train
from metareward.stages.verdicts import force_verdicts

__all__ = [
    "ACTOR_PAIRS", "ADAPTER", "ELO", "JUDGE_PAIRS", "JUDGMENTS", "META_JUDGMENTS", "META_TARGETS", "PRE_TRAIN_CHECKS", "PROMPTS",
    "RESPONSES", "SCORES", "SUMMARY", "TRAIN", "TRAIN_STATE",
    "ActorPairsResult", "ChecksResult", "GenerateResult", "JudgePairsResult", "JudgeResult", "MetaJudgeResult",
    "SamplePromptsResult", "StageResult", "SummaryResult", "TrainResult",
    "ShardJob", "ShardReport", "ShardRunner",
    "actor_pairs", "force_verdicts", "generate", "judge", "judge_pairs", "judgment_id_of", "meta_judge",
    "pre_train_checks", "read_summaries", "response_id_of", "run_shard", "sample_prompts", "shard_prompt_ids", "shard_seed",
    "stage_fingerprint", "stored_summary", "summary", "summary_keys", "train",
]
