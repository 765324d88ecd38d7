"""The run config: one pydantic model for a Meta-Rewarding run, loaded from YAML.

`load_config(path)` reads a YAML file into a `RunConfig`; unknown keys are an error that names the
key and where it sits (`judge.tempreature`), and so is every invalid value. `RunConfig.for_iteration(i)`
resolves the per-iteration overrides into the effective `IterationConfig` of iteration i (numbered as
the spec: iteration 1 is the M0 -> M1 step); each stage reads only its declared part of that
(`metareward.contract`).

Defaults are the paper's settings where the paper states them (K=7, N=11, rho, the length caps,
sampling 0.8 / 0.95) and a documented choice where it does not (the spec's [choice] points). The
paper's per-iteration schedule is not the default (overrides the user did not write would silently
beat the base values they did); it is spelled out in `RunConfig`'s docstring, ready to paste.

Every model here is JSON-schema friendly (plain scalars, literals, nested models, a dict keyed by
iteration number), so Prefect renders flow parameters of these types as a form: each field shows its
one-line `Field(description=...)`, each model a short summary (`json_schema_extra`); the docstrings
stay the full reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from metareward.checks.config import ChecksConfig
from metareward.engines.base import EngineConfig
from metareward.execution import ExecutionConfig
from metareward.meta import DEFAULT_L2, ELO_TIE_TOLERANCE
from metareward.storage import StorageConfig, validate_run_name
from metareward.training import TrainingConfig

VerdictMode = Literal["parse", "forced"]


class ConfigError(ValueError):
    """A config file that cannot be used: bad YAML, an unknown key, an invalid value. The message
    names the file and the dotted path of every offending key."""


class PromptsConfig(BaseModel):
    """Where prompts come from and how each iteration samples them.

    Source
        source: `embedded` (the prompt set shipped in the package) or a Parquet / JSONL / CSV file
            with a `prompt` column, as a local path or an fsspec URL (`s3://bucket/prompts.parquet`;
            credentials come from the run's storage config or the environment).
    Sampling
        per_iteration: prompts sampled for each iteration (the paper: 5,000 of a 20,000 pool).
        holdout_fraction: share of the pool reserved for evaluation and never trained on [choice: 0.1].
        without_replacement: iterations see disjoint prompts while the pool lasts [choice: on]; off
            samples each iteration from the whole training pool.
    Sampling is seeded by the run's `seed` and the iteration number, so a re-run draws the same prompts.
    """

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"description": "Where prompts come from and how each iteration samples them."}
    )

    source: str = Field(
        default="embedded", description="`embedded` or a Parquet / JSONL / CSV file (path or URL) with a `prompt` column."
    )
    per_iteration: int = Field(default=5000, ge=1, description="Prompts sampled for each iteration (the paper: 5,000).")
    holdout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of the pool held out for evaluation.")
    without_replacement: bool = Field(default=True, description="Disjoint prompts in each iteration while the pool lasts.")


class ActorConfig(BaseModel):
    """The actor: K responses per prompt.

    Sampling
        k: responses per prompt (the paper: 7).
        temperature, top_p: the paper's 0.8 and 0.95.
        max_tokens: longest response in tokens [choice: 1024; the paper's responses run about
            2,000 characters].
    Duplicates
        dedup: remove exact duplicate responses to one prompt before judging (counted in the
            generate summary) [choice: on; one source says the paper does].
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"description": "The actor: K responses per prompt."})

    k: int = Field(default=7, ge=1, description="Responses per prompt (the paper: 7).")
    temperature: float = Field(default=0.8, ge=0.0, description="Temperature of the responses (the paper: 0.8).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Top-p of the responses (the paper: 0.95).")
    max_tokens: int = Field(default=1024, ge=1, description="Longest response, in tokens.")
    dedup: bool = Field(default=True, description="Remove exact duplicate responses to one prompt before judging.")


class JudgeConfig(BaseModel):
    """The judge: N judgments per response with the spec's additive 5-point rubric.

    Sampling
        n: judgments per response (the paper: 11; Self-Rewarding used 3).
        temperature, top_p: [choice: 0.8 and 0.95, the actor's; N samples need a temperature above 0
            to differ]. The forced verdict (`verdict_mode: forced`) samples the score at this temperature.
        max_tokens: longest judgment [choice: 256; the rubric asks for up to 100 words].
    """

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"description": "The judge: N judgments per response with the additive 5-point rubric."}
    )

    n: int = Field(default=11, ge=1, description="Judgments per response (the paper: 11).")
    temperature: float = Field(default=0.8, ge=0.0, description="Sampling temperature of the judgments.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Top-p of the judgments' sampling.")
    max_tokens: int = Field(default=256, ge=1, description="Longest judgment, in tokens.")


class MetaJudgeConfig(BaseModel):
    """The meta-judge: which of two judgments of one response is more accurate.

    Sampling
        temperature, top_p: [choice: 0.8 and 0.95]. The forced verdict samples the winner at this
            temperature.
        max_tokens: longest meta-judgment [choice: 512].
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"description": "The meta-judge: which of two judgments of one response is more accurate."},
    )

    temperature: float = Field(default=0.8, ge=0.0, description="Sampling temperature of the meta-judgments.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Top-p of the meta-judgments' sampling.")
    max_tokens: int = Field(default=512, ge=1, description="Longest meta-judgment, in tokens.")


class PairsConfig(BaseModel):
    """How actor pairs and judge pairs are selected.

    Actor pairs
        rho: quality-tier width of the length control, in [0, 0.5); 0 is plain Self-Rewarding (best vs
            worst). The paper, one source: 0, 0.32, 0.32, 0.4 in iterations 1-4.
        length_measure: `chars` (the paper's reporting) or `tokens` (the model's tokenizer) [choice].
        max_chosen_chars: drop a pair whose chosen response is longer, in characters; 0 = no cap (one
            source: 2,500 in iteration 1).
    Judge pairs
        train_judge_pairs: whether this iteration trains judge pairs; off also skips the meta-judge
            (the paper: on in iterations 1-2, off in 3-4).
        max_chosen_judgment_chars: drop a pair whose chosen judgment is longer; 0 = no cap (one source:
            1,100 in iteration 1, 1,000 in iteration 2).
        require_distinct_judge_scores: drop a pair whose two judgments gave the same score [peer
            implementation, not the paper: off].
    Elo (Bradley-Terry over the battle matrix)
        elo_l2: strength of the L2 term that keeps the fit finite when one judgment wins everything,
            in units of battle weight [choice: `metareward.meta.DEFAULT_L2`, 0.01].
        elo_tie_tolerance: Elo points; judgments this close to the highest (lowest) Elo tie for
            chosen (rejected), and a target whose highest and lowest Elo are this close gives no pair
            [choice: `metareward.meta.ELO_TIE_TOLERANCE`, 1e-6].
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"description": "How actor pairs and judge pairs are selected."})

    rho: float = Field(default=0.0, ge=0.0, lt=0.5, description="Quality-tier width of the length control; 0: best vs worst.")
    length_measure: Literal["chars", "tokens"] = Field(default="chars", description="Unit of length: characters or tokens.")
    max_chosen_chars: int = Field(
        default=2500, ge=0, description="Drop an actor pair whose chosen response is longer, in characters; 0 = no cap."
    )
    train_judge_pairs: bool = Field(default=True, description="Whether judge pairs train; off also skips the meta-judge.")
    max_chosen_judgment_chars: int = Field(
        default=1100, ge=0, description="Drop a judge pair whose chosen judgment is longer, in characters; 0 = no cap."
    )
    require_distinct_judge_scores: bool = Field(default=False, description="Drop a judge pair whose two scores are equal.")
    elo_l2: float = Field(default=DEFAULT_L2, gt=0.0, description="L2 term keeping the Elo fit finite.")
    elo_tie_tolerance: float = Field(default=ELO_TIE_TOLERANCE, ge=0.0, description="Elo points within which judgments tie.")


class EvaluationConfig(BaseModel):
    """The evaluation of a run (`flows/evaluate.py`, `metareward evaluate`, docs/evaluation.md).

    When
        at_end_of_iteration: evaluate M_i at the end of each iteration that trained one, after its
            summary [choice: off; on a CPU it costs minutes the demo does not have].
    Win rate (M_i against M_{i-1} on the held-out prompts, each comparison in both orders)
        judge: the fixed judge: `seed` (the run's seed model M0), or a model as in `model` (a local
            folder, an `s3://` checkpoint, a hub id) [choice: seed].
        judge_engine: how the judge is served; null = the run's `engine`. For a stronger model behind
            an OpenAI-compatible server: backend `openai`, `base_url`, `model` (the served name), with
            `judge` naming a local folder holding that model's tokenizer (forced verdicts render its
            chat template locally).
        max_prompts: held-out prompts used, the first of the held-out slice's seeded order [choice: 100].
        max_tokens, temperature, top_p: sampling of each model's response [choice: 256 tokens; the
            actor's 0.8 and 0.95, so the models answer as they do in training].
        judge_max_tokens: longest comparison or rubric judgment [choice: 256].
        judge_temperature: sampling of the judge's text and of its forced verdicts [choice: 0, greedy:
            the judge's most likely verdict, not its sampling noise].
        verdict_mode: `forced` (parse first; where that fails, the judge's own choice between the
            options, counted as `forced`) or `parse` (unparsable verdicts are left out, counted)
            [choice: forced, so a small judge still gives every comparison a verdict].
        bootstrap_samples, confidence: percentile bootstrap over prompts for the intervals of the win
            rate and the length-controlled win rate [choice: 1000 resamples, 0.95].
    Judge accuracy (M_i and M_{i-1} as rubric judges of a preference set)
        preference_set: `embedded` (the set shipped in `metareward/data/preference_pairs.jsonl`) or a
            Parquet / JSONL file (local or `s3://`) with columns `prompt`, `chosen`, `rejected`.
        max_pairs: pairs used, the first of the file; 0 = all.
    Seed
        seed: seed of the sampling; null = the run's `seed`.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "description": "The evaluation of a run: win rate of M_i against M_{i-1} on the held-out prompts under a "
            "fixed judge, and both models' judge accuracy on a preference set."
        },
    )

    at_end_of_iteration: bool = Field(default=False, description="Evaluate M_i at the end of each iteration that trained one.")
    judge: str = Field(
        default="seed", description="The fixed judge: `seed` (M0), a local folder, an `s3://` checkpoint or a hub id."
    )
    judge_engine: EngineConfig | None = Field(default=None, description="How the judge is served; null = the run's `engine`.")
    max_prompts: int = Field(default=100, ge=1, description="Held-out prompts used, the first of their seeded order.")
    max_tokens: int = Field(default=256, ge=1, description="Longest response of each model, in tokens.")
    temperature: float = Field(default=0.8, ge=0.0, description="Sampling temperature of each model's responses.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Top-p of each model's responses.")
    judge_max_tokens: int = Field(default=256, ge=1, description="Longest comparison or rubric judgment, in tokens.")
    judge_temperature: float = Field(
        default=0.0, ge=0.0, description="Temperature of the judge's text and verdicts; 0 is greedy."
    )
    verdict_mode: VerdictMode = Field(default="forced", description="`forced` (parse, else the judge's own choice) or `parse`.")
    bootstrap_samples: int = Field(default=1000, ge=1, description="Bootstrap resamples over prompts for the intervals.")
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0, description="Confidence level of the bootstrap intervals.")
    preference_set: str = Field(
        default="embedded", description="`embedded` or a Parquet / JSONL file (`prompt`, `chosen`, `rejected`)."
    )
    max_pairs: int = Field(default=0, ge=0, description="Preference pairs used, the first of the set; 0 = all.")
    seed: int | None = Field(default=None, description="Seed of the evaluation's sampling; null = the run's `seed`.")

    @field_validator("judge", "preference_set")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class IterationOverrides(BaseModel):
    """Settings of one iteration that differ from the run's base settings. A field left out (or
    null) keeps the base value; caps take 0 for "no cap", as in the base settings.

    Pairs
        rho, train_judge_pairs, max_chosen_chars, max_chosen_judgment_chars: as in `pairs`.
    Prompts
        prompts_per_iteration: as `prompts.per_iteration`.
    Verdicts
        verdict_mode: as the run's `verdict_mode`.
    Lengths
        actor_max_tokens, judge_max_tokens, meta_judge_max_tokens: each role's `max_tokens`.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "description": "Settings of one iteration that differ from the run's base settings; "
            "a field left out (or null) keeps the base value."
        },
    )

    rho: float | None = Field(default=None, ge=0.0, lt=0.5, description="`pairs.rho` in this iteration.")
    train_judge_pairs: bool | None = Field(default=None, description="`pairs.train_judge_pairs` in this iteration.")
    max_chosen_chars: int | None = Field(default=None, ge=0, description="`pairs.max_chosen_chars` in this iteration.")
    max_chosen_judgment_chars: int | None = Field(
        default=None, ge=0, description="`pairs.max_chosen_judgment_chars` in this iteration."
    )
    prompts_per_iteration: int | None = Field(default=None, ge=1, description="`prompts.per_iteration` in this iteration.")
    verdict_mode: VerdictMode | None = Field(default=None, description="The run's `verdict_mode` in this iteration.")
    actor_max_tokens: int | None = Field(default=None, ge=1, description="`actor.max_tokens` in this iteration.")
    judge_max_tokens: int | None = Field(default=None, ge=1, description="`judge.max_tokens` in this iteration.")
    meta_judge_max_tokens: int | None = Field(default=None, ge=1, description="`meta_judge.max_tokens` in this iteration.")


class IterationConfig(BaseModel):
    """The effective settings of one iteration: the run's base settings with that iteration's
    overrides applied. Built by `RunConfig.for_iteration(i)`; the stage functions take it.

    Identity
        run: the run's name; iteration: i (iteration 1 trains M0 into M1); seed: the run's seed (each
            stage derives its own seeds from it, the iteration and the shard).
    Prompts
        earlier_prompts_per_iteration: the sample sizes of iterations 1 .. i-1 (they decide where
            iteration i's slice of the pool starts when sampling without replacement).
    Roles
        prompts, actor, judge, meta_judge, verdict_mode, pairs, training, engine: as in `RunConfig`,
            resolved for iteration i.
    Sharding
        shard_size: prompts per shard of generation, judging and meta-judging.
        execution: where the shards run (not in any stage's settings: it never changes a table).
    What each stage reads of it is declared in `metareward.contract`.
    """

    model_config = ConfigDict(extra="forbid")

    run: str
    iteration: int = Field(ge=1)
    seed: int
    earlier_prompts_per_iteration: list[int] = Field(default_factory=list)
    prompts: PromptsConfig
    actor: ActorConfig
    judge: JudgeConfig
    meta_judge: MetaJudgeConfig
    verdict_mode: VerdictMode
    pairs: PairsConfig
    training: TrainingConfig
    engine: EngineConfig
    shard_size: int = Field(ge=1)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)


class RunConfig(BaseModel):
    """One Meta-Rewarding run: its name, seed model, storage, engine, the three roles, pair selection,
    training, and per-iteration overrides.

    Run
        name: the run's name, a folder under the storage root (letters, digits, `.`, `_`, `-`, starting
            with a letter or digit; `metareward.storage.validate_run_name`).
        seed: the one seed every random choice derives from (prompt sampling, generation per shard,
            tie-breaks), so a re-run repeats the same texts.
        max_iterations: the run stops after iteration `max_iterations` (the paper: 4).
    Model and storage
        model: the seed model M0: `embedded` (SmolLM2-135M-Instruct shipped with the package), a local
            folder with safetensors weights, or a hub id.
        storage: where artifacts and checkpoints go (`./runs` by default, or `s3://bucket/prefix`).
        keep_last_checkpoints: how many of the run's checkpoints `{run}/iter-{i}/model` stay in storage:
            after each trained iteration the newest this many are kept and older ones are removed
            (`metareward.checkpoints.prune_checkpoints`; each is a full copy of the model, about 32 GB
            for 8B parameters in fp32) [choice: 2, the model the next iteration starts from and the
            one before it, to compare with or go back to]. 0 or null keeps every checkpoint. The
            checkpoint the next iteration starts from is never removed, nor the seed M0 (it lies
            outside the run's folder). A removed checkpoint shows as pruned in `metareward status`;
            the iteration's pairs, metrics and summary stay.
        engine: how the model is served for all three roles.
    Roles
        prompts, actor, judge, meta_judge: see their models.
        verdict_mode: `parse` (the paper: an unparsable score or winner is dropped) or `forced` (parse
            first; where that fails, complete the rationale with the model's own sampled choice
            among the allowed options, status `forced`) [choice: parse].
    Pairs and training
        pairs: actor- and judge-pair selection. training: the DPO step.
    Sharding
        shard_size: prompts per shard of generation, judging and meta-judging; each shard is
            committed on its own, so a killed stage loses at most the shard in flight [choice: 32].
        execution: where the stages run: this process (`backend: local`, the default) or a Ray
            cluster (`backend: ray`; `metareward.execution.ExecutionConfig`, docs/scaling.md). Never
            part of a cache key: the same seeds give the same tables on either.
    Evaluation
        evaluation: win rate of M_i against M_{i-1} and judge accuracy (`EvaluationConfig`).
        checks: judge-health checks and the gates that act on them: before training and, with the
            evaluation, on M_i's promotion (`metareward.checks.ChecksConfig`, docs/diagnostics.md#checks).
    Per iteration
        iterations: overrides keyed by iteration number (1 = M0 -> M1). The paper's schedule
            (one source) reads::

                iterations:
                  1: {rho: 0.0, max_chosen_chars: 2500, max_chosen_judgment_chars: 1100}
                  2: {rho: 0.32, max_chosen_chars: 0, max_chosen_judgment_chars: 1000}
                  3: {rho: 0.32, max_chosen_chars: 0, train_judge_pairs: false}
                  4: {rho: 0.4, max_chosen_chars: 0, train_judge_pairs: false}
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "description": "One Meta-Rewarding run: its name, seed model, storage, engine, the three roles, pair selection, "
            "training, evaluation and per-iteration overrides."
        },
    )

    name: str = Field(description="The run's name, a folder under the storage root (letters, digits, `.`, `_`, `-`).")
    seed: int = Field(default=0, description="The seed every random choice derives from, so a re-run repeats the same texts.")
    max_iterations: int = Field(default=4, ge=1, description="The run stops after this iteration (the paper: 4).")
    model: str = Field(default="embedded", description="The seed model M0: `embedded`, a local folder or a hub id.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Where artifacts and checkpoints go.")
    keep_last_checkpoints: int | None = Field(
        default=2, ge=0, description="Newest iteration checkpoints kept in storage (older ones are removed); 0 or null keeps all."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="How the model is served for all three roles.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Where prompts come from and how they are sampled.")
    actor: ActorConfig = Field(default_factory=ActorConfig, description="The actor: K responses per prompt and their sampling.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge: N judgments per response and their sampling.")
    meta_judge: MetaJudgeConfig = Field(default_factory=MetaJudgeConfig, description="The meta-judge's sampling.")
    verdict_mode: VerdictMode = Field(
        default="parse", description="`parse` (unparsable verdicts are dropped, the paper) or `forced` (the model's own choice)."
    )
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Actor- and judge-pair selection.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="DPO settings of the train stage.")
    shard_size: int = Field(default=32, ge=1, description="Prompts per shard of generation, judging and meta-judging.")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description="Stages run here or on a Ray cluster.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Win rate vs M_{i-1} and judge accuracy.")
    checks: ChecksConfig = Field(default_factory=ChecksConfig, description="Judge-health checks, the gates before training and after the evaluation.")
    iterations: dict[int, IterationOverrides] = Field(default_factory=dict, description="Per-iteration overrides (1 = M0 -> M1).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        validate_run_name(name)
        return name

    @model_validator(mode="after")
    def _check_iterations(self) -> RunConfig:
        for iteration in self.iterations:
            if iteration < 1:
                raise ValueError(f"iterations: key {iteration} is not an iteration number (iteration 1 is M0 -> M1)")
        return self

    def _prompts_per_iteration(self, iteration: int) -> int:
        overrides = self.iterations.get(iteration)
        if overrides is not None and overrides.prompts_per_iteration is not None:
            return overrides.prompts_per_iteration
        return self.prompts.per_iteration

    def for_iteration(self, iteration: int) -> IterationConfig:
        """The effective settings of iteration `iteration` (1 = M0 -> M1): the base settings with
        `iterations[iteration]` applied."""
        if iteration < 1:
            raise ValueError(f"iteration must be 1 or more (iteration 1 is M0 -> M1), got {iteration}")
        overrides = self.iterations.get(iteration, IterationOverrides())

        def pick(override: Any, base: Any) -> Any:
            return base if override is None else override

        pairs = self.pairs.model_copy(
            update={
                "rho": pick(overrides.rho, self.pairs.rho),
                "train_judge_pairs": pick(overrides.train_judge_pairs, self.pairs.train_judge_pairs),
                "max_chosen_chars": pick(overrides.max_chosen_chars, self.pairs.max_chosen_chars),
                "max_chosen_judgment_chars": pick(
                    overrides.max_chosen_judgment_chars, self.pairs.max_chosen_judgment_chars
                ),
            }
        )
        return IterationConfig(
            run=self.name,
            iteration=iteration,
            seed=self.seed,
            earlier_prompts_per_iteration=[self._prompts_per_iteration(earlier) for earlier in range(1, iteration)],
            prompts=self.prompts.model_copy(update={"per_iteration": self._prompts_per_iteration(iteration)}),
            actor=self.actor.model_copy(update={"max_tokens": pick(overrides.actor_max_tokens, self.actor.max_tokens)}),
            judge=self.judge.model_copy(update={"max_tokens": pick(overrides.judge_max_tokens, self.judge.max_tokens)}),
            meta_judge=self.meta_judge.model_copy(
                update={"max_tokens": pick(overrides.meta_judge_max_tokens, self.meta_judge.max_tokens)}
            ),
            verdict_mode=pick(overrides.verdict_mode, self.verdict_mode),
            pairs=pairs,
            training=self.training,
            engine=self.engine,
            shard_size=self.shard_size,
            execution=self.execution,
            checks=self.checks,
        )


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key {path!r}"
    shown = repr(error.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{path}: {error['msg']} (got {shown})"


def parse_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a mapping (parsed YAML, a flow parameter) into a `RunConfig`; `source` names it in
    errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        problems = "\n".join(f"  - {_describe(item)}" for item in error.errors())
        raise ConfigError(f"{source}: invalid run config:\n{problems}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config. Unknown keys, invalid values and bad YAML raise `ConfigError` naming the
    file and each offending key by its dotted path (`judge.tempreature`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, source=str(path))
