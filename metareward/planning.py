"""The cost model of a run: counts, tokens and hours per iteration from its config, before renting
the machines (`metareward plan CONFIG`; docs/scaling.md).

Per iteration i (`RunConfig.for_iteration(i)`, P = its prompts, K = `actor.k`, N = `judge.n`):

    responses           P x K              the actor's samples (before duplicates are removed)
    judgments           P x K x N          the judge's samples (one request per response, n = N)
    meta comparisons    P x N x (N - 1)    one target response per prompt, every ordered pair of its
                                           judgments (`metareward.meta.plan_comparisons`); 0 when the
                                           iteration trains no judge pairs (the meta-judge does not run)

All three are upper bounds: duplicates, invalid judgments and prompts without score variance make
the real counts smaller. Generated tokens of a role = its count x the mean length of its texts;
prefill (input) tokens = requests x the mean prompt length of that role's requests, counted once
per request (vLLM's n samples of one request share their prompt) and without prefix caching (an
upper bound). Hours of a stage:

    (generated + prefill / prefill_speedup) / shards x waves / tokens_per_second / 3600

where `tokens_per_second` is one engine's generation throughput for the model (measure it), shards
= ceil(P / `shard_size`), each shard runs on one engine, and waves = ceil(shards / engines) rounds
of at most `engines` shards run one after another; the engines are `gpus //
execution.ray.gpus_per_engine` with `execution.backend: ray` and 1 with `local`. With shards a
multiple of the engines this is tokens / (tokens_per_second x engines); otherwise the last wave
leaves engines idle and the hours say so.
Stages run one after another; an iteration's hours are the sum of its stages' (plus DPO when a
training throughput is given). Engine loading, forced verdicts and storage are not counted.

Mean lengths come from the newest complete iteration of the same run in storage when there is one
(responses: their `n_tokens`; other texts: a token column when the table has one, else characters /
`CHARS_PER_TOKEN`), else from the assumptions below; every figure carries its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from metareward.config import IterationConfig, RunConfig
from metareward.execution import shard_size_advice
from metareward.prompts import render_judge_prompt, render_meta_judge_prompt
from metareward.schema import JUDGMENT, META_JUDGMENT, N_TOKENS, PROMPT, RESPONSE
from metareward.stages import JUDGMENTS, META_JUDGMENTS, PROMPTS, RESPONSES, SUMMARY
from metareward.storage import Store, is_complete, read_artifact

# Rough characters per token of English text for Llama- and GPT-style BPE tokenizers; used where a
# table stores text but no token count (judgments, meta-judgments, prompts, the templates).
CHARS_PER_TOKEN = 4.0

# Assumed mean output length of each role as a share of its `max_tokens`, used when storage holds no
# complete iteration of the run. actor: the paper's responses run about 2,000 characters (~500
# tokens) [one source], half of the paper config's 1,024; judge: the rubric asks for up to 100 words
# (~130 tokens) and a score line, about 0.3 of 512; meta_judge: the prompt sets no length [choice: half].
ASSUMED_OUTPUT_FRACTION = {"actor": 0.5, "judge": 0.3, "meta_judge": 0.5}

# Assumed mean length of a user prompt in tokens when no iteration is stored [choice: a generous
# guess for one-turn instructions such as the paper's Llama-2-70B-written prompts].
ASSUMED_PROMPT_TOKENS = 100.0

# Prefill processes a prompt's tokens in parallel: one prefill token costs about 1/10 of a generated
# one on a GPU with vLLM [choice: a rough figure; measure it for your model and batch sizes].
DEFAULT_PREFILL_SPEEDUP = 10.0

# Length keys: the user prompt and each role's output.
PROMPT_TEXT, ACTOR, JUDGE, META_JUDGE = "prompt", "actor", "judge", "meta_judge"
ROLES = (ACTOR, JUDGE, META_JUDGE)

# The artifact and text column holding each kind of text (docs/artifacts.md).
_TEXT_OF = {PROMPT_TEXT: (PROMPTS, PROMPT), ACTOR: (RESPONSES, RESPONSE), JUDGE: (JUDGMENTS, JUDGMENT), META_JUDGE: (META_JUDGMENTS, META_JUDGMENT)}

_JUDGE_TEMPLATE_TOKENS = len(render_judge_prompt("", "")) / CHARS_PER_TOKEN
_META_TEMPLATE_TOKENS = len(render_meta_judge_prompt("", "", "", "")) / CHARS_PER_TOKEN


class PlanError(ValueError):
    """A plan that cannot be made: a non-positive throughput or GPU count, or GPUs too few for one
    engine. The message names the option or config key."""


@dataclass(frozen=True)
class MeanLength:
    """The mean length of one kind of text in tokens, and where the figure comes from."""

    tokens: float
    source: str


@dataclass
class IterationPlan:
    """Expected work of one iteration. Tokens per role (`actor`, `judge`, `meta_judge`); hours are
    None without a throughput."""

    iteration: int
    prompts: int
    responses: int
    judgments: int
    meta_comparisons: int
    trains_judge_pairs: bool
    lengths: dict[str, MeanLength]
    generated_tokens: dict[str, float]
    prefill_tokens: dict[str, float]
    shards: int
    waves: int
    shard_advice: str | None
    actor_pairs: int
    judge_pairs: int
    train_examples: float
    train_tokens: float
    stage_hours: dict[str, float] | None = None
    train_hours: float | None = None

    @property
    def generation_hours(self) -> float | None:
        return None if self.stage_hours is None else sum(self.stage_hours.values())

    @property
    def hours(self) -> float | None:
        """Generation plus DPO when both are known; generation alone without a training throughput."""
        if self.stage_hours is None:
            return None
        return self.generation_hours + (self.train_hours or 0.0)


@dataclass
class RunPlan:
    """The plan of every iteration 1 .. max_iterations of a run, with the inputs it assumed."""

    run: str
    gpus: int
    engines: int
    gpus_per_engine: float
    tokens_per_second: float | None
    prefill_speedup: float
    train_tokens_per_second: float | None
    iterations: list[IterationPlan]
    notes: list[str] = field(default_factory=list)

    def total(self, name: str) -> float:
        """The sum over iterations of an `IterationPlan` attribute (a number)."""
        return sum(getattr(plan, name) for plan in self.iterations)

    def total_tokens(self, kind: str) -> float:
        """Generated (`generated_tokens`) or prefill (`prefill_tokens`) tokens of all roles and iterations."""
        return sum(sum(getattr(plan, kind).values()) for plan in self.iterations)

    @property
    def hours(self) -> float | None:
        if self.tokens_per_second is None:
            return None
        return sum(plan.hours for plan in self.iterations)


def measured_lengths(store: Store, run: str) -> dict[str, MeanLength]:
    """Mean lengths measured on the run's complete iterations in `store`: for each kind of text
    (`prompt`, `actor`, `judge`, `meta_judge`), the newest complete iteration whose artifact holds
    rows of it. Kinds no complete iteration holds are missing from the result."""
    complete = [i for i in store.list_iterations(run) if is_complete(store, store.stage_uri(run, i, SUMMARY))]
    lengths: dict[str, MeanLength] = {}
    for kind, (artifact, text_column) in _TEXT_OF.items():
        for iteration in reversed(complete):
            uri = store.stage_uri(run, iteration, artifact)
            if not is_complete(store, uri):
                continue
            table = read_artifact(store, uri)
            if table.empty:
                continue
            if N_TOKENS in table.columns:
                how = f"mean {N_TOKENS}"
                tokens = float(table[N_TOKENS].mean())
            else:
                how = f"mean characters / {CHARS_PER_TOKEN:g} (no token column)"
                tokens = float(table[text_column].str.len().mean()) / CHARS_PER_TOKEN
            lengths[kind] = MeanLength(tokens, f"measured: iteration {iteration} {artifact}, {how}, {len(table):,} rows")
            break
    return lengths


def assumed_lengths(config: IterationConfig) -> dict[str, MeanLength]:
    """The lengths assumed without a measurement: `ASSUMED_OUTPUT_FRACTION` of each role's
    `max_tokens`, `ASSUMED_PROMPT_TOKENS` for a user prompt."""
    max_tokens = {ACTOR: config.actor.max_tokens, JUDGE: config.judge.max_tokens, META_JUDGE: config.meta_judge.max_tokens}
    lengths = {PROMPT_TEXT: MeanLength(ASSUMED_PROMPT_TOKENS, "assumed: ASSUMED_PROMPT_TOKENS (metareward.planning)")}
    for role, limit in max_tokens.items():
        share = ASSUMED_OUTPUT_FRACTION[role]
        lengths[role] = MeanLength(share * limit, f"assumed: {share:g} x {role}.max_tokens {limit} (ASSUMED_OUTPUT_FRACTION)")
    return lengths


def _engines(config: RunConfig, gpus: int) -> tuple[int, float, list[str]]:
    """(engines, GPUs per engine, notes) for `gpus` GPUs under the run's execution backend."""
    notes = []
    if config.execution.backend == "ray":
        per_engine = config.execution.ray.gpus_per_engine
        key = "execution.ray.gpus_per_engine"
        if per_engine <= 0:
            raise PlanError(
                f"{key} is 0 (CPU engines): GPUs do not set the number of engines; give the engines GPUs to plan a GPU run"
            )
        engines = int(gpus // per_engine)
    else:
        # `local` runs one engine in the flow's process; vLLM spreads it over tensor_parallel_size GPUs.
        per_engine = config.engine.tensor_parallel_size if config.engine.backend == "vllm" else 1
        key = "engine.tensor_parallel_size"
        engines = 1 if gpus >= per_engine else 0
        if gpus > per_engine:
            notes.append(
                f"execution.backend is local: one engine on {per_engine:g} GPU(s), {gpus - per_engine:g} GPU(s) idle during "
                "generation; execution.backend: ray runs one engine per execution.ray.gpus_per_engine GPUs"
            )
    if engines < 1:
        raise PlanError(f"--gpus {gpus} is fewer than one engine needs ({key}: {per_engine:g})")
    return engines, per_engine, notes


def _train_examples(config: IterationConfig, pairs: int) -> float:
    """Pairs the DPO step runs through: `max_steps` x the global batch when set, else pairs x epochs."""
    training = config.training
    if training.max_steps is not None:
        return float(training.max_steps * training.per_device_train_batch_size * training.gradient_accumulation_steps * training.num_processes)
    return pairs * training.num_train_epochs


def plan_iteration(
    config: IterationConfig,
    lengths: dict[str, MeanLength],
    engines: int,
    tokens_per_second: float | None = None,
    prefill_speedup: float = DEFAULT_PREFILL_SPEEDUP,
    train_tokens_per_second: float | None = None,
) -> IterationPlan:
    """The expected work of one iteration with these mean `lengths` (every kind of text) on `engines`
    engines; hours when the throughputs are given (tokens per second of one engine; of the whole DPO step)."""
    prompts, k, n = config.prompts.per_iteration, config.actor.k, config.judge.n
    trains_judge_pairs = config.pairs.train_judge_pairs
    responses = prompts * k
    judgments = responses * n
    meta_comparisons = prompts * n * (n - 1) if trains_judge_pairs else 0

    prompt, response, judgment, meta_judgment = (lengths[kind].tokens for kind in (PROMPT_TEXT, ACTOR, JUDGE, META_JUDGE))
    judge_request = _JUDGE_TEMPLATE_TOKENS + prompt + response
    generated = {ACTOR: responses * response, JUDGE: judgments * judgment, META_JUDGE: meta_comparisons * meta_judgment}
    prefill = {
        ACTOR: prompts * prompt,
        JUDGE: responses * judge_request,
        META_JUDGE: meta_comparisons * (_META_TEMPLATE_TOKENS + prompt + response + 2 * judgment),
    }

    shards = math.ceil(prompts / config.shard_size)
    waves = math.ceil(shards / engines)
    advice = None
    if config.execution.backend == "ray":
        advice = shard_size_advice(config.execution.ray, prompts, config.shard_size, engines)

    # At most one actor pair per prompt, one judge pair per meta-judged prompt, capped by the mix settings.
    actor_pairs = prompts
    judge_pairs = prompts if trains_judge_pairs else 0
    if config.training.max_judge_pairs is not None:
        judge_pairs = min(judge_pairs, config.training.max_judge_pairs)
    if config.training.judge_pairs_ratio is not None:
        judge_pairs = min(judge_pairs, int(config.training.judge_pairs_ratio * actor_pairs + 1e-9))
    # A pair is two sequences through the model: prompt + chosen and prompt + rejected.
    pair_tokens = actor_pairs * 2 * (prompt + response) + judge_pairs * 2 * (judge_request + judgment)
    pairs = actor_pairs + judge_pairs
    train_examples = _train_examples(config, pairs)
    train_tokens = train_examples * pair_tokens / pairs if pairs else 0.0

    plan = IterationPlan(
        iteration=config.iteration,
        prompts=prompts,
        responses=responses,
        judgments=judgments,
        meta_comparisons=meta_comparisons,
        trains_judge_pairs=trains_judge_pairs,
        lengths=lengths,
        generated_tokens=generated,
        prefill_tokens=prefill,
        shards=shards,
        waves=waves,
        shard_advice=advice,
        actor_pairs=actor_pairs,
        judge_pairs=judge_pairs,
        train_examples=train_examples,
        train_tokens=train_tokens,
    )
    if tokens_per_second is not None:
        plan.stage_hours = {
            role: (generated[role] + prefill[role] / prefill_speedup) / shards * waves / tokens_per_second / 3600 for role in ROLES
        }
    if train_tokens_per_second is not None:
        plan.train_hours = train_tokens / train_tokens_per_second / 3600
    return plan


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise PlanError(f"{name} must be greater than 0, got {value:g}")


def plan_run(
    config: RunConfig,
    gpus: int = 1,
    tokens_per_second: float | None = None,
    prefill_speedup: float = DEFAULT_PREFILL_SPEEDUP,
    train_tokens_per_second: float | None = None,
    measured: dict[str, MeanLength] | None = None,
) -> RunPlan:
    """The plan of iterations 1 .. `max_iterations` of `config` on `gpus` GPUs. `measured` lengths
    (`measured_lengths`) replace the assumed ones kind by kind."""
    _check_positive("--gpus", gpus)
    _check_positive("--tokens-per-second", tokens_per_second)
    _check_positive("--prefill-speedup", prefill_speedup)
    _check_positive("--train-tokens-per-second", train_tokens_per_second)
    engines, per_engine, notes = _engines(config, gpus)
    plans = []
    for iteration in range(1, config.max_iterations + 1):
        iteration_config = config.for_iteration(iteration)
        lengths = assumed_lengths(iteration_config) | (measured or {})
        plans.append(plan_iteration(iteration_config, lengths, engines, tokens_per_second, prefill_speedup, train_tokens_per_second))
    return RunPlan(
        run=config.name,
        gpus=gpus,
        engines=engines,
        gpus_per_engine=per_engine,
        tokens_per_second=tokens_per_second,
        prefill_speedup=prefill_speedup,
        train_tokens_per_second=train_tokens_per_second,
        iterations=plans,
        notes=notes,
    )


def tokens_text(value: float) -> str:
    """A token count for a table cell: 17.9M, 385.0k, 1,250."""
    for threshold, unit, suffix in ((1e9, 1e9, "B"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if value >= threshold:
            return f"{value / unit:.1f}{suffix}"
    return f"{value:,.0f}"


def hours_text(value: float | None) -> str:
    """Hours for a table cell, `-` when unknown (no throughput given)."""
    return "-" if value is None else f"{value:,.2f}"
