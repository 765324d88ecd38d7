"""The engine interface: one model, three roles (actor, judge, meta-judge).

Every backend (`hf`, `vllm`, `openai`) implements `Engine`. Conversations are chat message lists
(`[{"role": "user", "content": ...}, ...]`); the model's chat template turns them into text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, str]
Conversation = Sequence[Message]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generate call. `seed` seeds the call's random state (the caller
    passes one seed per shard, so re-running a shard repeats its texts exactly)."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (hit max_tokens)


@dataclass(frozen=True)
class Choice:
    """The option picked after `prefix`, and every option's probability (they sum to 1: the
    probabilities of the options' whole texts given the prefix, renormalised over the options)."""

    option: str
    probabilities: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    backend: str

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling, n: int) -> list[list[Completion]]:
        """n completions per conversation, in input order."""

    def choose(
        self,
        conversations: Sequence[Conversation],
        prefix: str,
        options: Sequence[str],
        temperature: float,
        seed: int = 0,
    ) -> list[Choice]:
        """Each conversation ends with a (possibly empty) assistant message; the model continues
        that assistant text followed by `prefix` and picks one of `options` (the scored text is
        `render_choice_context`'s: the prompt of that message, its text as given, `prefix`). The
        pick is sampled from the option probabilities at `temperature` (0 = argmax), seeded by
        `seed`."""

    def close(self) -> None:
        """Free the model (and its GPU memory, for GPU backends)."""


class EngineConfig(BaseModel):
    """How the model is served. One config for all three roles of an iteration.

    Common
        backend: `hf` (transformers, CPU or GPU), `vllm` (offline vLLM in a child process),
            `openai` (an OpenAI-compatible server such as `vllm serve`).
        device: `cpu`, `cuda` or `auto` (hf only; vLLM picks its own platform).
        dtype: `float32`, `bfloat16`, `float16` or `auto`.
        trust_remote_code: off by default; only for checkpoints whose code you have read.
    hf
        batch_size: sequences per forward pass (batches never cross a shard).
        prefix_cache: read each shared token prefix once (`metareward.engines.prefix_cache`): the
            rubric of every judge prompt, the n samples of one prompt, the prompt a forced verdict
            continues. Off: every prompt is read in full (the engine before the cache; sampled
            texts differ between the two, greedy ones agree).
        prefix_cache_mib: the cache's memory bound; least recently used blocks go first. It never
            changes a result: a block is computed the same way whether it was evicted or not.
    vllm
        tensor_parallel_size, gpu_memory_utilization, max_model_len, enforce_eager
        (True on CPU: 40 s start instead of 200 s), enable_prefix_caching, cpu_kvcache_gib.
        On CPU set dtype `float32`: `auto` makes vLLM pick bf16, about half as fast there.
        python: the interpreter of an environment that has vLLM and this project (vLLM pins
        fastapi<0.137 while Prefect 3.9 needs >=0.139, so they live in separate environments:
        `make venv-gpu` builds `.venv-gpu`, `make test-vllm` builds `.venv-vllm`); the engine's
        child process runs on it. Default: the running interpreter.
    openai
        base_url (e.g. http://127.0.0.1:8000/v1), model (the served name; default: the
        checkpoint path), api_key_env (the variable holding the key; never logged),
        concurrency, max_retries, timeout_s.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "vllm", "openai"] = "hf"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    trust_remote_code: bool = False
    batch_size: int = Field(default=8, ge=1)
    prefix_cache: bool = True
    prefix_cache_mib: int = Field(default=512, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=64)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    cpu_kvcache_gib: int = Field(default=2, ge=1)
    python: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(default=8, ge=1)
    max_retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)
