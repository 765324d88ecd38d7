"""The `hf` engine on the real embedded model (SmolLM2-135M-Instruct), and the engine cache."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from metareward.checkpoints import CheckpointError, ModelRef
from metareward.engines import load_engine, loaded_engines, release_engines
from metareward.engines.base import EngineConfig, Sampling
from metareward.engines.choice import render_choice_context
from tests.fixtures import chat_templates
from tests.fixtures.chat_templates import CHAT_TEMPLATES, direct_option_probabilities, scored_text

SCORE_OPTIONS = [str(score) for score in range(6)]


def _judge_conversation(answer: str, rationale: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"Review the answer below and rate it from 0 to 5.\nAnswer: {answer}"},
        {"role": "assistant", "content": rationale},
    ]


JUDGE_CONVERSATIONS = [
    _judge_conversation("Paris is the capital of France.", "The answer is correct and concise.\n"),
    _judge_conversation("The sun orbits the earth.", "This is wrong: the earth orbits the sun, so the answer misleads.\n"),
    _judge_conversation("2 + 2 = 4", ""),
]


@pytest.fixture(scope="module")
def engine(seed_dir: Path):
    from metareward.engines.hf import HFEngine

    # batch_size 2: the calls below span several batches, with padding inside them.
    hf_engine = HFEngine(seed_dir, EngineConfig(backend="hf", device="cpu", batch_size=2))
    yield hf_engine
    hf_engine.close()


def _naive_option_probabilities(engine, conversation, prefix: str, options: list[str]) -> dict[str, float]:
    """Each option's whole-text probability from one unpadded forward pass per option, renormalised."""
    return direct_option_probabilities(engine.model, engine._encode, scored_text(engine.tokenizer, conversation, prefix), options)


def test_import_metareward_engines_loads_no_backend():
    probe = "import sys, metareward.engines, metareward.checkpoints; print(sorted({'torch', 'transformers', 'vllm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_load_engine_verifies_the_checkpoint_first(tmp_path: Path):
    with pytest.raises(CheckpointError, match="folder not found"):
        load_engine(EngineConfig(backend="hf"), ModelRef(uri=str(tmp_path / "missing"), sha256="0" * 64))
    assert loaded_engines() == []


@pytest.mark.model
def test_generate_n_samples_with_token_counts_and_finish_reasons(engine):
    conversations = [
        [{"role": "user", "content": "Write a short poem about the sea."}],
        [{"role": "user", "content": "Give me three tips for learning to cook."}],
    ]
    results = engine.generate(conversations, Sampling(temperature=0.9, top_p=0.95, max_tokens=16, seed=7), n=3)
    assert [len(row) for row in results] == [3, 3]
    for row in results:
        for completion in row:
            assert completion.text.strip()
            assert completion.finish_reason in ("stop", "length")
            assert 1 <= completion.n_tokens <= 16
            if completion.finish_reason == "length":
                assert completion.n_tokens == 16
        assert len({completion.text for completion in row}) > 1  # n independent samples


@pytest.mark.model
def test_generate_stop_and_length_count_generated_tokens(engine):
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    [[answer]] = engine.generate(question, Sampling(temperature=0, max_tokens=48), n=1)
    assert answer.finish_reason == "stop"
    assert "Paris" in answer.text
    assert answer.n_tokens == len(engine._encode(answer.text)) + 1  # the text's tokens and the end-of-turn token

    [[cut]] = engine.generate(question, Sampling(temperature=0, max_tokens=3), n=1)
    assert cut.finish_reason == "length" and cut.n_tokens == 3
    assert answer.text.startswith(cut.text)

    greedy_copies = engine.generate(question, Sampling(temperature=0, max_tokens=3), n=2)
    assert greedy_copies == [[cut, cut]]


@pytest.mark.model
def test_seeded_generate_repeats_exactly(engine):
    import torch

    conversations = [
        [{"role": "user", "content": "Name a color and say why you like it."}],
        [{"role": "user", "content": "Tell me a fun fact about cats, please, in one sentence."}],
        [{"role": "user", "content": "Hi!"}],
    ]
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=8, seed=123)
    state_before = torch.get_rng_state()
    first = engine.generate(conversations, sampling, n=2)
    assert torch.equal(torch.get_rng_state(), state_before)  # the caller's random state is left alone
    torch.manual_seed(999)  # whatever the global state, the call's own seed decides
    assert engine.generate(conversations, sampling, n=2) == first
    other_seed = engine.generate(conversations, Sampling(temperature=1.0, top_p=0.95, max_tokens=8, seed=124), n=2)
    assert other_seed != first


@pytest.mark.model
def test_choose_returns_an_option_with_probabilities_summing_to_one(engine):
    choices = engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=1.0, seed=3)
    assert len(choices) == len(JUDGE_CONVERSATIONS)
    for choice in choices:
        assert choice.option in SCORE_OPTIONS
        assert list(choice.probabilities) == SCORE_OPTIONS
        assert math.isclose(sum(choice.probabilities.values()), 1.0, abs_tol=1e-9)
        assert all(0 < p < 1 for p in choice.probabilities.values())
    assert engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=1.0, seed=3) == choices

    greedy = engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=0)
    for choice in greedy:
        assert choice.option == max(choice.probabilities, key=choice.probabilities.get)


@pytest.mark.model
def test_choose_probabilities_do_not_depend_on_the_batch(engine):
    together = engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=0)
    for conversation, batched in zip(JUDGE_CONVERSATIONS, together):
        [alone] = engine.choose([conversation], "Score: ", SCORE_OPTIONS, temperature=0)
        for option in SCORE_OPTIONS:
            assert alone.probabilities[option] == pytest.approx(batched.probabilities[option], abs=1e-5)


@pytest.mark.model
@pytest.mark.parametrize(
    "split_a, split_b",
    [
        (("Score: ", SCORE_OPTIONS), ("Score:", [f" {score}" for score in SCORE_OPTIONS])),
        # " A" is one token: "Judgement " + "A" merges across the prefix/option boundary.
        (("Winner: Judgement", [" A", " B"]), ("Winner: Judgement ", ["A", "B"])),
    ],
)
def test_choose_scores_whole_option_texts_however_split(engine, split_a, split_b):
    (prefix_a, options_a), (prefix_b, options_b) = split_a, split_b
    conversation = JUDGE_CONVERSATIONS[1]
    [choice_a] = engine.choose([conversation], prefix_a, options_a, temperature=0)
    [choice_b] = engine.choose([conversation], prefix_b, options_b, temperature=0)
    naive = _naive_option_probabilities(engine, conversation, prefix_a, options_a)
    for option_a, option_b in zip(options_a, options_b):
        assert prefix_a + option_a == prefix_b + option_b
        assert choice_a.probabilities[option_a] == pytest.approx(naive[option_a], abs=1e-5)
        assert choice_b.probabilities[option_b] == pytest.approx(naive[option_a], abs=1e-5)


@pytest.fixture(params=sorted(CHAT_TEMPLATES))
def templated_engine(request: pytest.FixtureRequest, engine, monkeypatch: pytest.MonkeyPatch):
    """The shared engine with one published chat template on its tokenizer (restored afterwards)."""
    monkeypatch.setattr(engine.tokenizer, "chat_template", CHAT_TEMPLATES[request.param])
    return engine


@pytest.mark.model
def test_choose_context_is_the_prompt_then_the_rationale_as_stored(templated_engine):
    tokenizer = templated_engine.tokenizer
    for conversation in chat_templates.JUDGE_CONVERSATIONS:
        rationale = conversation[-1]["content"]
        prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        text = render_choice_context(tokenizer, conversation, "Score: ")
        assert text == prompt + rationale + "Score: "
        if rationale:  # it ends with a newline, which trimming templates dropped before the verdict
            assert text.endswith("\nScore: ")


@pytest.mark.model
def test_a_trimming_template_keeps_the_newline_before_the_verdict(engine, monkeypatch: pytest.MonkeyPatch):
    # Llama-3's template trims contents: `continue_final_message` gave "...incompleteScore: ".
    monkeypatch.setattr(engine.tokenizer, "chat_template", CHAT_TEMPLATES["llama3"])
    conversation = chat_templates.JUDGE_CONVERSATIONS[0]
    expected = (
        f"{engine.tokenizer.bos_token}<|start_header_id|>user<|end_header_id|>\n\n{chat_templates.JUDGE_QUESTION}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "This is wrong: the earth orbits the sun,\nso the answer is incomplete\nScore: "
    )
    assert render_choice_context(engine.tokenizer, conversation, "Score: ") == expected
    empty = render_choice_context(engine.tokenizer, chat_templates.JUDGE_CONVERSATIONS[1], "Score: ")
    assert empty.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nScore: ")


@pytest.mark.model
def test_choose_matches_a_direct_forward_pass_on_published_templates(templated_engine):
    conversations = chat_templates.JUDGE_CONVERSATIONS
    options = chat_templates.SCORE_OPTIONS
    choices = templated_engine.choose(conversations, "Score: ", options, temperature=0)
    for conversation, choice in zip(conversations, choices):
        text = scored_text(templated_engine.tokenizer, conversation, "Score: ")
        direct = direct_option_probabilities(templated_engine.model, templated_engine._encode, text, options)
        for option in options:
            assert choice.probabilities[option] == pytest.approx(direct[option], abs=1e-5)


def test_choose_needs_a_message_before_the_open_assistant_turn():
    from metareward.engines.choice import check_open_assistant_turns

    with pytest.raises(ValueError, match="conversation 0 has only the assistant message"):
        check_open_assistant_turns([[{"role": "assistant", "content": "Good."}]])


@pytest.mark.model
def test_choose_refuses_bad_input(engine):
    with pytest.raises(ValueError, match="end with an assistant message"):
        engine.choose([[{"role": "user", "content": "hi"}]], "Score: ", SCORE_OPTIONS, temperature=0)
    with pytest.raises(ValueError, match="distinct"):
        engine.choose(JUDGE_CONVERSATIONS, "Score: ", ["1", "1"], temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        engine.choose(JUDGE_CONVERSATIONS, "Score: ", SCORE_OPTIONS, temperature=-1)


@pytest.mark.model
def test_load_engine_reuses_one_engine_until_released(seed_ref: ModelRef):
    config = EngineConfig(backend="hf", device="cpu", batch_size=4)
    first = load_engine(config, seed_ref)
    try:
        assert load_engine(EngineConfig(backend="hf", device="cpu", batch_size=4), seed_ref) is first
        assert loaded_engines() == [first]
        assert first.backend == "hf"
        [[completion]] = first.generate([[{"role": "user", "content": "Hello"}]], Sampling(temperature=0, max_tokens=2), n=1)
        assert completion.n_tokens >= 1
    finally:
        release_engines()
    assert loaded_engines() == []
    with pytest.raises(RuntimeError, match="after close"):
        first.generate([[{"role": "user", "content": "Hello"}]], Sampling(max_tokens=2), n=1)
    reloaded = load_engine(config, seed_ref)
    try:
        assert reloaded is not first
    finally:
        release_engines()
