"""The `hf` backend: transformers on CPU or one GPU, batched, reproducible.

Supported: Hugging Face format causal LMs in a local, verified folder (safetensors only; loaded with
`use_safetensors=True`), whose tokenizer has a chat template. `trust_remote_code` comes from the
config (off by default).

Device and dtype (`EngineConfig.device`, `.dtype`): `auto` picks CUDA when torch sees a GPU, else
the CPU; dtype `auto` is float32 on the CPU (CPUs without native bf16 run bf16 slowly) and the
checkpoint's own dtype on a GPU.

`generate`: each conversation is rendered with the chat template (generation prompt added) and
sampled `n` times. The n samples of every conversation become separate sequences; sequences are
sorted by prompt length (longest first) and cut into batches of `config.batch_size` sequences with
left padding, so a batch wastes little on padding and never holds anything but this call's inputs.
Sampling uses only `Sampling`'s settings (temperature, top_p, max_tokens): the checkpoint's own
sampling defaults (top_k, repetition penalty, ...) are dropped, as vLLM does when given explicit
sampling parameters. Temperature 0 is greedy decoding: one answer, copied n times. The random state
is seeded from `Sampling.seed` at the start of every call (and restored afterwards), so the same
call on the same inputs repeats its texts exactly. `finish_reason` is "stop" when the model ended
its turn (an end-of-sequence token) and "length" when it hit `max_tokens`; `n_tokens` counts the
generated tokens including that end token (as vLLM counts them).

`choose`: the context is the prompt the final assistant message answers (the conversation before
it, rendered with the generation prompt), that message's text as given, then `prefix`
(`render_choice_context`); each option is scored as the sum of the log-probabilities of
the tokens of context+option after the point where the context's and all options' tokenizations
part (`plan_option_scoring`), so an option's probability is that of its whole text however the
tokenizer merges it with the prefix. The scores are renormalised over the options and the pick is
sampled at `temperature` (0 = argmax) with a generator seeded by (seed, position) (`pick_option`).
Those three helpers are shared with the `vllm` and `openai` backends, so every backend scores and
picks the same way. Each scoring step is one left-padded sequence whose next-token distribution
is read at its last position; steps are length-sorted and batched like generation.

Calls on one engine are serialised (a lock): the seeded random state is process-wide.
"""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from metareward.engines.base import Choice, Completion, Conversation, EngineConfig, Sampling
from metareward.engines.choice import (
    check_choose_arguments,
    pick_option,
    plan_option_scoring,
    render_choice_context,
    render_choice_head,
)
from metareward.engines.prefix_cache import PrefixCache, supports
from metareward.engines.sampling import sample_next_tokens

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device is 'cuda' but torch sees no GPU on this machine; use 'cpu' or 'auto'")
    return torch.device(requested)


def _resolve_dtype(requested: str, device: torch.device) -> torch.dtype | str:
    if requested == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return _DTYPES[requested]


def _batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class HFEngine:
    """One transformers model serving generate and choose (see the module docstring)."""

    backend = "hf"

    def __init__(self, model_dir: Path, config: EngineConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.model_dir = Path(model_dir)
        self.config = config
        self.device = _resolve_device(config.device)
        self._lock = threading.Lock()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=config.trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"checkpoint {self.model_dir}: the tokenizer has no chat template (needed to render conversations)")
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir,
            dtype=_resolve_dtype(config.dtype, self.device),
            use_safetensors=True,
            trust_remote_code=config.trust_remote_code,
        )
        self.model = model.to(self.device).eval()

        checkpoint_eos = model.generation_config.eos_token_id
        eos_ids = set(checkpoint_eos if isinstance(checkpoint_eos, list) else [checkpoint_eos])
        eos_ids.add(self.tokenizer.eos_token_id)
        eos_ids.discard(None)
        if not eos_ids:
            raise ValueError(f"checkpoint {self.model_dir}: neither the tokenizer nor the generation config names an end-of-sequence token")
        self.eos_token_ids = sorted(eos_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        # Only `Sampling` shapes sampling: replace the checkpoint's defaults (top_k, penalties, ...).
        self.model.generation_config = GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        logger.info("hf engine: %s on %s (%s)", self.model_dir, self.device, self.model.dtype)
        self.prefix_cache: PrefixCache | None = None
        if config.prefix_cache:
            usable, layers = supports(self.model)
            if usable:
                self.prefix_cache = PrefixCache(self.model, config.prefix_cache_mib << 20)
                logger.info("hf engine: prefix cache on (blocks of %d tokens, at most %d MiB)", self.prefix_cache.block_tokens, config.prefix_cache_mib)
            else:
                logger.warning("hf engine: prefix cache off for %s: %s; every prompt is read in full", self.model_dir, layers)

    # --- helpers -------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self.model is None:
            raise RuntimeError("hf engine: used after close()")

    def _encode(self, text: str) -> list[int]:
        # Chat templates write their own special tokens.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_length(self, length: int, extra: int, what: str) -> None:
        if self.max_positions is not None and length + extra > self.max_positions:
            raise ValueError(
                f"hf engine: {what} has {length} tokens{f' + {extra} to generate' if extra else ''}, "
                f"more than the model's {self.max_positions} positions"
            )

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _completion(self, tokens: list[int]) -> Completion:
        ends = [position for position, token in enumerate(tokens) if token in self.eos_token_ids]
        if ends:
            text = self.tokenizer.decode(tokens[: ends[0]], skip_special_tokens=True)
            return Completion(text=text, n_tokens=ends[0] + 1, finish_reason="stop")
        return Completion(text=self.tokenizer.decode(tokens, skip_special_tokens=True), n_tokens=len(tokens), finish_reason="length")

    def _rng_devices(self) -> list[int]:
        """The GPUs whose random state a seeded call saves and restores (none on the CPU)."""
        return [self.device.index or 0] if self.device.type == "cuda" else []

    # --- the Engine interface ------------------------------------------------------------------

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling, n: int) -> list[list[Completion]]:
        """n completions per conversation, in input order (see the module docstring)."""
        from transformers import GenerationConfig

        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if sampling.temperature < 0:
            raise ValueError(f"generate: sampling.temperature must be >= 0, got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1:
            raise ValueError(f"generate: sampling.top_p must be in (0, 1], got {sampling.top_p}")
        if sampling.max_tokens < 1:
            raise ValueError(f"generate: sampling.max_tokens must be >= 1, got {sampling.max_tokens}")
        if sampling.seed < 0:
            raise ValueError(f"generate: sampling.seed must be >= 0, got {sampling.seed}")
        if not conversations:
            return []
        with self._lock:
            self._require_open()
            prompts = []
            for index, conversation in enumerate(conversations):
                text = self.tokenizer.apply_chat_template([dict(m) for m in conversation], tokenize=False, add_generation_prompt=True)
                prompts.append(self._encode(text))
                self._check_length(len(prompts[-1]), sampling.max_tokens, f"conversation {index}")

            greedy = sampling.temperature == 0
            samples = 1 if greedy else n
            settings: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "do_sample": not greedy}
            if not greedy:
                settings.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            generation_config = GenerationConfig(
                **settings, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, num_return_sequences=1
            )
            sequences = sorted(
                ((index, sample) for index in range(len(prompts)) for sample in range(samples)),
                key=lambda item: (-len(prompts[item[0]]), item),
            )
            results: dict[tuple[int, int], Completion] = {}
            # Seeded per call, and the caller's random state restored afterwards.
            if self.prefix_cache is not None:
                self.prefix_cache.forget_written()
            with torch.random.fork_rng(devices=self._rng_devices()), torch.inference_mode():
                torch.manual_seed(sampling.seed)
                for batch in _batches(sequences, self.config.batch_size):
                    if self.prefix_cache is None:
                        input_ids, attention_mask = self._left_pad([prompts[index] for index, _ in batch])
                        output = self.model.generate(
                            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
                        )
                        generated = output[:, input_ids.shape[1] :].tolist()
                    else:
                        generated = self._generate_from_prefixes([prompts[index] for index, _ in batch], sampling, greedy)
                    for item, tokens in zip(batch, generated):
                        results[item] = self._completion(tokens)
        return [[results[(index, 0 if greedy else sample)] for sample in range(n)] for index in range(len(prompts))]

    def _generate_from_prefixes(self, prompts: list[list[int]], sampling: Sampling, greedy: bool) -> list[list[int]]:
        """One batch through the prefix cache: each distinct prompt read once (its cached blocks,
        then its tail), its rows decoded together. Sampling: temperature, then top-p, from the
        seeded random state (`metareward.engines.sampling`); the tokens after a row's end are padding."""
        distinct = list(dict.fromkeys(tuple(prompt) for prompt in prompts))
        state = self.prefix_cache.prefill([list(prompt) for prompt in distinct], self.pad_token_id)
        rows = torch.tensor([distinct.index(tuple(prompt)) for prompt in prompts], device=self.device)
        cache, logits = state.for_decoding(rows, room=sampling.max_tokens), state.logits[rows]
        attention_mask, positions = state.attention_mask[rows], state.next_positions[rows]
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        unfinished = torch.ones(len(prompts), dtype=torch.bool, device=self.device)
        tokens = []
        for step in range(sampling.max_tokens):
            if greedy:
                next_tokens = logits.argmax(dim=-1)
            else:
                next_tokens = sample_next_tokens(logits, sampling.temperature, sampling.top_p)
            next_tokens = torch.where(unfinished, next_tokens, self.pad_token_id)
            tokens.append(next_tokens)
            unfinished &= ~torch.isin(next_tokens, eos)
            if step == sampling.max_tokens - 1 or not unfinished.any():
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
            logits = self.model(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=positions[:, None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :].float()
            positions = positions + 1
        generated = torch.stack(tokens, dim=1).tolist()
        # Kept for `choose`: each row's tokens read back (all but the last drawn), up to its end.
        read_back = [row[: len(tokens) - 1] for row in generated]
        read_back = [row[: next((at for at, token in enumerate(row) if token in self.eos_token_ids), len(row))] for row in read_back]
        self.prefix_cache.remember(prompts, read_back, cache, attention_mask, [state.cached[row] for row in rows.tolist()])
        return generated

    def choose(
        self,
        conversations: Sequence[Conversation],
        prefix: str,
        options: Sequence[str],
        temperature: float,
        seed: int = 0,
    ) -> list[Choice]:
        """Continue each conversation's final assistant message with `prefix` and pick one option."""
        options = check_choose_arguments(conversations, options, temperature, seed)
        if not conversations:
            return []
        with self._lock:
            self._require_open()
            plans = [
                plan_option_scoring(self._encode, render_choice_context(self.tokenizer, conversation, prefix), options)
                for conversation in conversations
            ]
            steps = [step for plan in plans for step in plan.steps]
            for position, step in enumerate(steps):
                self._check_length(len(step.prompt_ids), 0, f"choose context (scoring step {position})")
            limits = None
            if self.prefix_cache is not None:
                # Blocks hold the prompts `generate` read, not the texts it wrote: a step reuses its
                # prompt's blocks (one token short of it: the rationale's first characters may merge
                # with the prompt's last token), and, where it continues a row of the last `generate`
                # call, that row's keys and values as far as their token ids agree; the rest is its tail.
                heads = [len(self._encode(render_choice_head(self.tokenizer, conversation))) - 1 for conversation in conversations]
                limits = [head for head, plan in zip(heads, plans) for _ in plan.steps]
            step_logprobs = self._next_token_logprobs([step.prompt_ids for step in steps], [step.read_ids for step in steps], limits)
        choices, start = [], 0
        for position, plan in enumerate(plans):
            logprobs = plan.option_logprobs(step_logprobs[start : start + len(plan.steps)])
            start += len(plan.steps)
            choices.append(pick_option(options, logprobs, temperature, seed, position))
        return choices

    def _next_token_logprobs(
        self, prompts: list[list[int]], reads: list[list[int]], limits: list[int] | None
    ) -> list[dict[int, float]]:
        """For each prompt, the log-probabilities of the `reads` token ids as its next token (with
        the prefix cache: blocks within its first `limits` tokens)."""
        order = sorted(range(len(prompts)), key=lambda index: (-len(prompts[index]), index))
        results: list[dict[int, float]] = [{} for _ in prompts]
        with torch.inference_mode():
            for batch in _batches(order, self.config.batch_size):
                if self.prefix_cache is None:
                    input_ids, attention_mask = self._left_pad([prompts[index] for index in batch])
                    # Left padding: positions count real tokens only, so padding does not shift them.
                    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                    logits = self.model(
                        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1
                    ).logits[:, -1, :]
                else:
                    batch_limits = None if limits is None else [limits[index] for index in batch]
                    logits = self.prefix_cache.prefill(
                        [prompts[index] for index in batch], self.pad_token_id, batch_limits, reuse_written=True
                    ).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, index in enumerate(batch):
                    results[index] = {token: float(logprobs[row, token]) for token in reads[index]}
        return results

    def close(self) -> None:
        """Free the model (and its GPU memory). Safe to call twice."""
        with self._lock:
            if self.model is None:
                return
            self.model = None
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
                self.prefix_cache = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
