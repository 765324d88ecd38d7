"""Choosing one of a few options after a prefix, the same way in every backend.

`Engine.choose` scores each option's whole text given the prefix (however the tokenizer splits
prefix + option), renormalises over the options and samples at a temperature with a seeded
generator. The `hf`, `vllm` and `openai` backends share this planning and picking, so their
probabilities and picks agree; plus the per-request seed and finish-reason helpers they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from metareward.engines.base import Choice, Conversation

# vLLM's limit on `logprob_token_ids` per request (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS).
MAX_TOKEN_IDS_PER_STEP = 128


class UnexpectedFinishReason(RuntimeError):
    """A backend ended a generation for a reason other than end of turn or max_tokens."""


def request_seed(seed: int, position: int) -> int:
    """The seed of the `position`-th request of a call seeded with `seed` (a stable 32-bit value,
    so a re-run of the same shard repeats its samples, and two requests of a call differ)."""
    if seed < 0:
        raise ValueError(f"sampling.seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint32)[0])


def check_open_assistant_turns(conversations: Sequence[Conversation]) -> None:
    """`choose` continues the final assistant message of each conversation: refuse any without one,
    or without a message before it (the chat template renders what precedes that message)."""
    for index, conversation in enumerate(conversations):
        if not conversation or conversation[-1].get("role") != "assistant":
            role = conversation[-1].get("role") if conversation else None
            raise ValueError(
                f"choose: conversation {index} must end with an assistant message (possibly empty) that the "
                f"model continues; it ends with role {role!r}"
            )
        if len(conversation) < 2:
            raise ValueError(f"choose: conversation {index} has only the assistant message; it needs the messages it answers")


def render_choice_context(tokenizer: Any, conversation: Conversation, prefix: str) -> str:
    """The exact text after which `choose` scores the options, on every backend:

        chat template(conversation[:-1], add_generation_prompt=True) + conversation[-1]["content"] + prefix

    That is the prompt the model wrote the final assistant message after (the one `generate`
    renders), then that message's text exactly as given, then `prefix`. `tokenizer` is a
    transformers tokenizer with a chat template; `conversation` ends with an assistant message
    (possibly empty) preceded by at least one message.

    Not `continue_final_message`: templates that trim message content (Llama-3's `| trim`) lose
    the rationale's trailing newline there ("...incompleteScore: " where the stored judgment
    reads "...incomplete\nScore: 4"), and how transformers cuts the message differs between the
    versions the environments pin.
    """
    check_open_assistant_turns([conversation])
    return render_choice_head(tokenizer, conversation) + conversation[-1]["content"] + prefix


def render_choice_head(tokenizer: Any, conversation: Conversation) -> str:
    """The start of `render_choice_context`: the prompt the final assistant message answers,
    rendered as `generate` renders it (the messages before it, then the generation prompt)."""
    return tokenizer.apply_chat_template([dict(message) for message in conversation[:-1]], tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class ScoringStep:
    """One model call: the next-token log-probabilities of `read_ids` after `prompt_ids`."""

    prompt_ids: list[int]
    read_ids: list[int]


@dataclass(frozen=True)
class OptionPlan:
    """How to score options after one context: `steps` to run, and for each option the
    (step index, token id) pairs whose log-probabilities sum to the option's log-probability."""

    steps: list[ScoringStep]
    paths: list[list[tuple[int, int]]]

    def option_logprobs(self, step_logprobs: Sequence[dict[int, float]]) -> list[float]:
        """Each option's log-probability from the steps' results (token id -> log-probability)."""
        return [sum(step_logprobs[step][token] for step, token in path) for path in self.paths]


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def validate_options(options: Sequence[str]) -> list[str]:
    """The options as a list; refuses an empty list, empty strings and duplicates."""
    options = list(options)
    if not options:
        raise ValueError("choose: options is empty")
    if any(not isinstance(option, str) or option == "" for option in options):
        raise ValueError(f"choose: every option must be a non-empty string, got {options!r}")
    if len(set(options)) != len(options):
        raise ValueError(f"choose: options must be distinct, got {options!r}")
    return options


def check_choose_arguments(
    conversations: Sequence[Conversation], options: Sequence[str], temperature: float, seed: int
) -> list[str]:
    """The checks every backend's `choose` makes before any work: valid options (returned as a
    list), temperature >= 0, seed >= 0, and an open assistant turn at the end of each conversation."""
    options = validate_options(options)
    if temperature < 0:
        raise ValueError(f"choose: temperature must be >= 0, got {temperature}")
    if seed < 0:
        raise ValueError(f"choose: seed must be >= 0, got {seed}")
    check_open_assistant_turns(conversations)
    return options


def plan_option_scoring(encode: Callable[[str], list[int]], context: str, options: Sequence[str]) -> OptionPlan:
    """Plan the model calls that give each option's probability as a whole text after `context`.

    `encode` turns text into token ids (no special tokens added). Tokenizers may merge the end of
    the context with the start of an option ("Score: " + "5" can end in one " 5" token), so every
    option is tokenized together with the context, and the scoring starts where the context's and
    all options' token sequences part (`cut`): each option is scored as the tokens of its full
    sequence after `cut`, given the shared tokens before it. The text between `cut` and the end of
    the context is common to every option, so after renormalising over the options this is the
    probability of each option's whole text given the whole context, however it is split.
    Options sharing leading tokens share steps.
    """
    options = validate_options(options)
    context_ids = encode(context)
    full_ids = [encode(context + option) for option in options]
    cut = min(_common_prefix_length(context_ids, ids) for ids in full_ids)
    if cut == 0:
        raise ValueError("choose: the context and the options share no leading tokens; is the context empty?")
    tails = [ids[cut:] for ids in full_ids]
    for option, tail in zip(options, tails):
        if not tail:
            raise ValueError(f"choose: option {option!r} adds no token after the prefix")
    if len({tuple(tail) for tail in tails}) != len(tails):
        raise ValueError(f"choose: options {options!r} tokenize to the same tokens after the prefix")
    shared = context_ids[:cut]
    step_index: dict[tuple[int, ...], int] = {}
    reads: list[list[int]] = []
    paths: list[list[tuple[int, int]]] = []
    for tail in tails:
        path = []
        for position, token in enumerate(tail):
            key = tuple(tail[:position])
            if key not in step_index:
                step_index[key] = len(reads)
                reads.append([])
            index = step_index[key]
            if token not in reads[index]:
                reads[index].append(token)
            path.append((index, token))
        paths.append(path)
    steps = [ScoringStep(prompt_ids=shared + list(key), read_ids=sorted(reads[index])) for key, index in step_index.items()]
    for step in steps:
        if len(step.read_ids) > MAX_TOKEN_IDS_PER_STEP:
            raise ValueError(
                f"choose: {len(step.read_ids)} options start with different tokens; at most {MAX_TOKEN_IDS_PER_STEP} are supported"
            )
    return OptionPlan(steps=steps, paths=paths)


def pick_option(options: Sequence[str], logprobs: Sequence[float], temperature: float, seed: int, position: int) -> Choice:
    """Renormalise the options' log-probabilities over the options and pick one: the most likely at
    temperature 0 (the first on ties), else a sample from p**(1/temperature), seeded by
    (seed, position) so the same call repeats its picks."""
    if temperature < 0:
        raise ValueError(f"choose: temperature must be >= 0, got {temperature}")
    values = np.asarray(logprobs, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"choose: the model gave non-finite log-probabilities {list(values)} to options {list(options)!r}")
    probabilities = np.exp(values - values.max())
    probabilities /= probabilities.sum()
    if temperature == 0:
        index = int(np.argmax(values))
    else:
        scaled = np.exp((values - values.max()) / temperature)
        rng = np.random.default_rng([seed, position])
        index = int(rng.choice(len(options), p=scaled / scaled.sum()))
    return Choice(option=options[index], probabilities={option: float(p) for option, p in zip(options, probabilities)})


def finish_reason(reason: str | None, where: str) -> str:
    """Map a server/engine finish reason to `Completion.finish_reason` ("stop" or "length")."""
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    raise UnexpectedFinishReason(f"{where}: generation ended with finish reason {reason!r} (expected 'stop' or 'length')")
