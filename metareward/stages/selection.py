"""The pair-selection stages: length-controlled actor pairs from the responses' mean scores, and
judge pairs from the meta-judgments (position weights, battles, Elo)."""

from __future__ import annotations

from metareward import contract, meta, pairs as actor_pair_rules
from metareward.contract import ActorPairsSettings, JudgePairsSettings
from metareward.schema import CHOSEN_CHARS, CHOSEN_SCORE, PROMPT_ID, REJECTED_CHARS, REJECTED_SCORE, RESPONSE_ID, SCORE, SCORE_MEAN
from metareward.stages.common import artifact_uri, no_cap, read_tables, stage_info
from metareward.stages.results import (
    ACTOR_PAIRS,
    ELO,
    JUDGE_PAIRS,
    JUDGMENTS,
    META_JUDGMENTS,
    META_TARGETS,
    PROMPTS,
    RESPONSES,
    SCORES,
    ActorPairsResult,
    JudgePairsResult,
)
from metareward.storage import Store, write_artifact
from metareward.summaries import ActorPairsSummary, JudgePairsSummary


def actor_pairs(
    store: Store, run: str, settings: ActorPairsSettings, prompts_uri: str, responses_uri: str, scores_uri: str
) -> ActorPairsResult:
    """Length-controlled actor pairs (rho, `pairs.length_measure`, `pairs.max_chosen_chars`) from the
    responses' mean scores. Writes `actor_pairs`; drops counted by reason."""
    tables = read_tables(store, {PROMPTS: prompts_uri, RESPONSES: responses_uri, SCORES: scores_uri})
    # The scores are the judge stage's artifact: its fingerprint is the `judgments` role's.
    upstream = {"prompts": prompts_uri, "responses": responses_uri, "judgments": scores_uri}
    info = stage_info(store, contract.ACTOR_PAIRS, settings, None, upstream)
    scores = tables[SCORES].set_index(RESPONSE_ID)[SCORE_MEAN]
    responses = tables[RESPONSES].assign(**{SCORE: lambda table: table[RESPONSE_ID].map(scores).astype("float64")})
    rules = settings.pairs
    selected = actor_pair_rules.select_actor_pairs(
        responses,
        rules.rho,
        max_chosen_chars=no_cap(rules.max_chosen_chars),
        length=rules.length_measure,
        prompts=tables[PROMPTS],
        seed=settings.seed,
    )
    uri = artifact_uri(store, run, settings, ACTOR_PAIRS)
    manifest = write_artifact(store, uri, selected, info)
    summary = ActorPairsSummary(
        prompts=int(tables[RESPONSES][PROMPT_ID].nunique()),
        pairs=len(selected),
        dropped=dict(selected.attrs.get("dropped", {})),
        rho=rules.rho,
        mean_chosen_chars=float(selected[CHOSEN_CHARS].mean()) if len(selected) else None,
        mean_rejected_chars=float(selected[REJECTED_CHARS].mean()) if len(selected) else None,
    )
    return ActorPairsResult(stage="actor_pairs", uri=uri, uris={ACTOR_PAIRS: uri}, key=manifest["fingerprint"], summary=summary)


def judge_pairs(
    store: Store,
    run: str,
    settings: JudgePairsSettings,
    prompts_uri: str,
    responses_uri: str,
    judgments_uri: str,
    meta_targets_uri: str,
    meta_judgments_uri: str,
) -> JudgePairsResult:
    """Judge pairs from the meta-judgments: positional weights over the iteration, battle matrices,
    Bradley-Terry Elo, highest vs lowest Elo judgment with the caps and filters of `pairs`. Writes
    `elo` and `judge_pairs`; drops counted by reason."""
    tables = read_tables(
        store,
        {
            PROMPTS: prompts_uri,
            RESPONSES: responses_uri,
            JUDGMENTS: judgments_uri,
            META_TARGETS: meta_targets_uri,
            META_JUDGMENTS: meta_judgments_uri,
        },
    )
    upstream = {"prompts": prompts_uri, "responses": responses_uri, "judgments": judgments_uri, "meta_judgments": meta_judgments_uri}
    info = stage_info(store, contract.JUDGE_PAIRS, settings, None, upstream)
    rules = settings.pairs
    meta_judgments = tables[META_JUDGMENTS]
    w1, w2 = meta.positional_weights(meta_judgments)
    elo = meta.judgment_elo(meta_judgments, w1, w2, l2=rules.elo_l2)
    selected = meta.select_judge_pairs(
        elo,
        targets=tables[META_TARGETS],
        judgments=tables[JUDGMENTS],
        responses=tables[RESPONSES],
        prompts=tables[PROMPTS],
        max_chosen_chars=no_cap(rules.max_chosen_judgment_chars),
        require_distinct_scores=rules.require_distinct_judge_scores,
        elo_tolerance=rules.elo_tie_tolerance,
        seed=settings.seed,
    )
    elo_uri = artifact_uri(store, run, settings, ELO)
    write_artifact(store, elo_uri, elo, info)
    uri = artifact_uri(store, run, settings, JUDGE_PAIRS)
    manifest = write_artifact(store, uri, selected, info)
    summary = JudgePairsSummary(
        targets=len(tables[META_TARGETS]),
        pairs=len(selected),
        dropped=dict(selected.attrs.get("dropped", {})),
        w1=w1,
        w2=w2,
        judgments_with_elo=len(elo),
        chosen_score_higher=int((selected[CHOSEN_SCORE] > selected[REJECTED_SCORE]).sum()),
        chosen_longer=int((selected[CHOSEN_CHARS] > selected[REJECTED_CHARS]).sum()),
    )
    return JudgePairsResult(
        stage="judge_pairs", uri=uri, uris={ELO: elo_uri, JUDGE_PAIRS: uri}, key=manifest["fingerprint"], summary=summary
    )
