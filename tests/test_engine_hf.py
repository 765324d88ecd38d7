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


# ----------------------------------------------------------------------------------------------
# the prefix cache: each shared token prefix read once (metareward/engines/prefix_cache.py)

def _judge_prompts(pairs: list[tuple[str, str]]) -> list[list[dict[str, str]]]:
    from metareward.prompts import JUDGE_TEMPLATE

    return [[{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=prompt, response=response)}] for prompt, response in pairs]


JUDGE_PROMPTS = _judge_prompts([
    ("What is the capital of France?", "Paris."),
    ("Give me three tips for learning to cook.", "Use fresh food, taste as you go, clean up."),
    ("Why is the sky blue?", "Because air scatters blue sunlight more than red."),
])
OTHER_PROMPTS = _judge_prompts([("Name a colour.", "Green."), ("How do I make tea?", "Boil water, steep the leaves.")])


def _hf(seed_dir: Path, **changes):
    from metareward.engines.hf import HFEngine

    return HFEngine(seed_dir, EngineConfig(backend="hf", device="cpu", **{"batch_size": 4, **changes}))


def _texts(results) -> list[list[str]]:
    return [[completion.text for completion in row] for row in results]


@pytest.mark.model
def test_the_prefix_cache_gives_the_plain_paths_greedy_texts_and_option_probabilities(engine, seed_dir):
    plain = _hf(seed_dir, batch_size=2, prefix_cache=False)
    try:
        assert engine.prefix_cache is not None and plain.prefix_cache is None
        greedy = Sampling(temperature=0, max_tokens=24, seed=0)
        cached_texts, plain_texts = engine.generate(JUDGE_PROMPTS, greedy, n=2), plain.generate(JUDGE_PROMPTS, greedy, n=2)
        assert _texts(cached_texts) == _texts(plain_texts)
        contexts = [[*prompt, {"role": "assistant", "content": row[0].text}] for prompt, row in zip(JUDGE_PROMPTS, cached_texts)]
        cached = engine.choose(contexts, "Score: ", SCORE_OPTIONS, temperature=0.8, seed=1)
        direct = plain.choose(contexts, "Score: ", SCORE_OPTIONS, temperature=0.8, seed=1)
        for with_cache, without in zip(cached, direct):
            for option in SCORE_OPTIONS:
                assert with_cache.probabilities[option] == pytest.approx(without.probabilities[option], abs=1e-4)
    finally:
        plain.close()


@pytest.mark.model
def test_each_shared_prefix_is_read_once_and_choose_does_not_read_the_prompt_again(seed_dir):
    hf = _hf(seed_dir, batch_size=16)
    try:
        cache = hf.prefix_cache
        prompts = [hf._encode(hf.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)) for p in JUDGE_PROMPTS]
        block = cache.block_tokens
        blocks = {tuple(ids[:end]) for ids in prompts for end in range(block, cache.cached_length(len(ids)) + 1, block)}
        shared = min(_common(prompts[0], ids) for ids in prompts[1:]) // block
        assert shared >= 8  # the rubric: at least 8 blocks every judge prompt shares

        results = hf.generate(JUDGE_PROMPTS, Sampling(temperature=0.8, top_p=0.95, max_tokens=16, seed=3), n=3)
        # every distinct block computed once (the rubric's once for all three prompts); each
        # prompt's tail read once for its 3 samples
        assert cache.misses == len(blocks) and cache.hits == 0
        assert cache.tail_tokens == sum(len(ids) - cache.cached_length(len(ids)) for ids in prompts)

        misses, tail_tokens = cache.misses, cache.tail_tokens
        contexts = [[*prompt, {"role": "assistant", "content": row[0].text}] for prompt, row in zip(JUDGE_PROMPTS, results)]
        hf.choose(contexts, "Score: ", SCORE_OPTIONS, temperature=0)
        # the prompts' blocks come from the cache, the prompts' tails and the rationales from the
        # rows `generate` wrote: only the prefix "Score: " (and a token where the rationale's end
        # tokenizes otherwise) is read
        assert cache.misses == misses and cache.hits >= len(blocks)
        rationale_tokens = sum(row[0].n_tokens for row in results)
        assert cache.written_tokens >= rationale_tokens - 2 * len(results)
        assert cache.tail_tokens - tail_tokens <= 8 * len(results)
    finally:
        hf.close()
    assert hf.prefix_cache is None  # gone with the engine


def _common(a: list[int], b: list[int]) -> int:
    return next((position for position, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.model
def test_sampled_texts_are_the_same_with_a_warm_a_cold_or_an_evicting_cache(seed_dir):
    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=8, seed=5)
    outcomes = []
    for cache_mib, warm_up in ((512, True), (512, False), (1, True)):  # 1 MiB holds less than one block
        hf = _hf(seed_dir, prefix_cache_mib=cache_mib)
        try:
            if warm_up:
                hf.generate(OTHER_PROMPTS[:1] + JUDGE_PROMPTS[:1], Sampling(max_tokens=1), n=1)
            texts = _texts(hf.generate(JUDGE_PROMPTS[:2], sampling, n=3))
            contexts = [[*prompt, {"role": "assistant", "content": row[0]}] for prompt, row in zip(JUDGE_PROMPTS, texts)]
            verdicts = [choice.probabilities for choice in hf.choose(contexts, "Score: ", SCORE_OPTIONS, temperature=0.8, seed=2)]
            outcomes.append((texts, verdicts))
            if cache_mib == 1:
                assert hf.prefix_cache.bytes <= 1 << 20
        finally:
            hf.close()
    assert outcomes[0] == outcomes[1] == outcomes[2]  # bit for bit: the same texts and option probabilities
    assert len({text for row in outcomes[0][0] for text in row}) > 2  # real samples, not one text copied


TINY_MODELS = {
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=2048)),
    "mistral-sliding-window": (
        "MistralConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=64),
    ),
}


@pytest.fixture(scope="module")
def tiny_models(seed_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised two-layer models with the embedded tokenizer (its chat template), saved
    as safetensors. A wide initialisation makes their next tokens clear winners, not near-ties."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(seed_dir)
    folders = {}
    for name, (config_class, shape) in TINY_MODELS.items():
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer), max_position_embeddings=2048, initializer_range=0.5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape,
        )
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.mark.model
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_models_share_prefixes_where_every_layer_is_full_attention(name, tiny_models, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="metareward.engines.hf")
    cached, plain = _hf(tiny_models[name]), _hf(tiny_models[name], prefix_cache=False)
    try:
        sliding = name.endswith("sliding-window")
        assert (cached.prefix_cache is None) == sliding
        if sliding:
            assert "prefix cache off" in caplog.text and "DynamicSlidingWindowLayer" in caplog.text
        greedy = Sampling(temperature=0, max_tokens=12, seed=0)
        assert _texts(cached.generate(JUDGE_PROMPTS, greedy, n=1)) == _texts(plain.generate(JUDGE_PROMPTS, greedy, n=1))
        contexts = [[*prompt, {"role": "assistant", "content": "Fine.\n"}] for prompt in JUDGE_PROMPTS]
        for with_cache, without in zip(
            cached.choose(contexts, "Score: ", SCORE_OPTIONS, temperature=0), plain.choose(contexts, "Score: ", SCORE_OPTIONS, temperature=0)
        ):
            for option in SCORE_OPTIONS:
                assert with_cache.probabilities[option] == pytest.approx(without.probabilities[option], abs=1e-4)
        if not sliding:
            assert cached.prefix_cache.hits > 0
    finally:
        cached.close()
        plain.close()


@pytest.mark.model
def test_decoding_writes_into_reserved_room_with_the_numbers_of_a_growing_cache(tiny_models):
    import torch

    hf = _hf(tiny_models["qwen2"])
    try:
        prompts = [hf._encode(hf.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)) for p in JUDGE_PROMPTS[:2]]
        rows, steps = torch.tensor([0, 0, 1]), torch.randint(0, 1000, (5, 3, 1), generator=torch.Generator().manual_seed(0))
        logits = {}
        for arm in ("concatenating", "reserved"):
            state = hf.prefix_cache.prefill(prompts, hf.pad_token_id)
            if arm == "reserved":
                cache = state.for_decoding(rows, room=2)  # 5 steps: out of room at the third, moved to a larger buffer
                assert type(cache.layers[0]).__name__ == "RoomyLayer"
            else:
                cache = state.cache
                cache.reorder_cache(rows)
            mask, positions, read = state.attention_mask[rows], state.next_positions[rows], []
            with torch.inference_mode():
                for step in steps:
                    mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
                    output = hf.model(input_ids=step, attention_mask=mask, position_ids=positions[:, None], past_key_values=cache, use_cache=True)
                    read.append(output.logits)
                    positions = positions + 1
            logits[arm] = torch.cat(read)
            assert cache.get_seq_length() == mask.shape[1]
        assert torch.equal(logits["concatenating"], logits["reserved"])
    finally:
        hf.close()
