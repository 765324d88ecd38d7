"""The run's input files checked before anything starts: the prompt pool and the preference set.

`check_inputs(config)` reads what a run will read first, so a bad file is refused in a second with
one message, instead of failing inside a flow after the Prefect API started. `metareward run`,
`iterate` and `evaluate` call it before Prefect starts (a refusal exits with code 2, as a bad config
does); `run_flow` and `evaluate_flow` call it again for runs started from the UI or a deployment.

It refuses, with `InputError` (a `ConfigError`: the message names the config, the key, the file and,
where there is one, the row, its line in the file and the column):
- a prompt file that `prompt_sources.load_prompt_pool` refuses (missing, unreadable, an invalid JSON
  line, no `prompt` column, empty or non-text prompts, empty or duplicate ids);
- a pool whose training part (after `prompts.holdout_fraction`) is smaller than one iteration's
  sample, for any iteration up to `max_iterations` (per-iteration overrides included);
- when the evaluation will run (`evaluation.at_end_of_iteration`, or `metareward evaluate`): a
  preference set that `evaluation.load_preference_set` refuses, and a pool with no held-out prompts.

A pool smaller than all iterations' samples together is not an error: sampling without replacement
then starts a new pass over the pool (`metareward.prompt_sources`, by design), so prompts repeat
across iterations. `check_inputs` returns that as a note for the caller to show.
"""

from __future__ import annotations

import math

from metareward import prompt_sources
from metareward.config import ConfigError, RunConfig
from metareward.storage import StorageError, Store, is_transient_storage_error


class InputError(ConfigError):
    """An input file of the run (prompts, preference set) that cannot be used, or a prompt pool too
    small for the configured samples."""


def check_inputs(config: RunConfig, evaluation: bool | None = None, source: str = "config") -> list[str]:
    """Read and check the run's prompt pool (and, when `evaluation` is true, or None and
    `evaluation.at_end_of_iteration` is on, its preference set). Raises `InputError`; returns notes
    (prompts that will repeat across iterations). `source` names the config in messages."""
    store = Store(config.storage)
    try:
        pool = prompt_sources.load_prompt_pool(config.prompts.source, store=store)
    except prompt_sources.PromptSourceError as error:
        raise InputError(f"{source}: prompts.source: {error}") from None
    except (StorageError, OSError) as error:  # credentials, a bucket that is not there
        if is_transient_storage_error(error):  # an outage: the flows' task retries it
            raise
        raise InputError(f"{source}: prompts.source: prompt file {config.prompts.source} cannot be read: {error}") from None

    held = math.ceil(config.prompts.holdout_fraction * len(pool)) if config.prompts.holdout_fraction > 0 else 0
    train = len(pool) - held
    where = "the embedded prompt set" if config.prompts.source in (None, prompt_sources.EMBEDDED) else config.prompts.source
    pool_words = f"{len(pool)} prompts in {where} less {held} held out by prompts.holdout_fraction {config.prompts.holdout_fraction}"
    if train < 1:
        raise InputError(f"{source}: prompts.holdout_fraction: no prompt is left for training ({pool_words})")
    last = config.for_iteration(config.max_iterations)
    sizes = [*last.earlier_prompts_per_iteration, last.prompts.per_iteration]
    for iteration, size in enumerate(sizes, start=1):
        if size > train:
            override = config.iterations.get(iteration)
            key = (
                f"iterations.{iteration}.prompts_per_iteration"
                if override is not None and override.prompts_per_iteration is not None
                else "prompts.per_iteration"
            )
            raise InputError(
                f"{source}: {key}: iteration {iteration} samples {size} prompts but the training pool holds {train} ({pool_words})"
            )

    notes = []
    passes = _new_passes(sizes, train) if config.prompts.without_replacement else []
    if passes:
        notes.append(
            f"{source}: from iteration {passes[0]} on, iterations repeat prompts of earlier ones: iterations 1-{len(sizes)} "
            f"sample {sum(sizes)} prompts together and the training pool holds {train} ({pool_words}); a new pass "
            f"over the pool starts at iteration(s) {', '.join(map(str, passes))}"
        )

    if evaluation is None:
        evaluation = config.evaluation.at_end_of_iteration
    if evaluation:
        if held == 0:
            raise InputError(f"{source}: prompts.holdout_fraction: the evaluation needs held-out prompts and there are none ({pool_words})")
        from metareward.evaluation import PreferenceSetError, load_preference_set

        try:
            load_preference_set(config.evaluation.preference_set, store=store)
        except PreferenceSetError as error:
            raise InputError(f"{source}: evaluation.preference_set: {error}") from None
        except (StorageError, OSError) as error:
            if is_transient_storage_error(error):
                raise
            raise InputError(
                f"{source}: evaluation.preference_set: {config.evaluation.preference_set} cannot be read: {error}"
            ) from None
    return notes


def _new_passes(sizes: list[int], train: int) -> list[int]:
    """The iterations that start a new pass over a training pool of `train` prompts, as
    `prompt_sources.sample_prompts` walks it without replacement."""
    cursor, starts = 0, []
    for iteration, size in enumerate(sizes, start=1):
        if cursor + size > train:
            cursor = 0
            starts.append(iteration)
        cursor += size
    return starts
