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

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"description": "How the model is served (`hf`, `vllm` or `openai`), one config for all three roles."},
    )

    backend: Literal["hf", "vllm", "openai"] = Field(
        default="hf", description="`hf` (transformers), `vllm` (vLLM in a child process) or `openai` (an OpenAI-compatible API)."
    )
    device: Literal["cpu", "cuda", "auto"] = Field(default="auto", description="hf: `cpu`, `cuda` or `auto`.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="auto", description="Weights' dtype; on CPU with vLLM set `float32` (`auto` picks the slower bf16 there)."
    )
    trust_remote_code: bool = Field(default=False, description="Run a checkpoint's own code: only code you have read.")
    batch_size: int = Field(default=8, ge=1, description="hf: sequences per forward pass (batches never cross a shard).")
    prefix_cache: bool = Field(default=True, description="hf: read each shared token prefix once; off: every prompt in full.")
    prefix_cache_mib: int = Field(
        default=512, ge=1, description="hf: memory bound of the prefix cache, in MiB (never changes a result)."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs one model is split over.")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1, description="vllm: share of GPU memory vLLM may take.")
    max_model_len: int | None = Field(
        default=None, ge=64, description="vllm: longest sequence in tokens; null = the model's `max_position_embeddings`."
    )
    enforce_eager: bool = Field(
        default=False, description="vllm: run eagerly, without graph capture (on CPU: a 40 s start instead of 200 s)."
    )
    enable_prefix_caching: bool = Field(default=True, description="vllm: reuse the KV cache of shared prompt prefixes.")
    cpu_kvcache_gib: int = Field(default=2, ge=1, description="vllm on CPU: KV cache space, in GiB.")
    python: str | None = Field(
        default=None, description="vllm: interpreter of an environment with vLLM and this project; null = this one."
    )
    base_url: str | None = Field(default=None, description="openai: the server's URL, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = Field(default=None, description="openai: the served model's name; null = the checkpoint path.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="openai: the environment variable holding the API key (never logged)."
    )
    concurrency: int = Field(default=8, ge=1, description="openai: requests in flight at once.")
    max_retries: int = Field(default=3, ge=0, description="openai: extra attempts after a transient fault, with backoff.")
    timeout_s: float = Field(default=600.0, gt=0, description="openai: timeout of one request, in seconds.")
