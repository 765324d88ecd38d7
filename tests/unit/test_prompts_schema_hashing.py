"""Prompt templates, the artifact schema's validators, and the stable hashes."""

import hashlib
import string

import numpy as np
import pandas as pd
import pytest

from metareward import schema
from metareward.hashing import prompt_id_of, tie_break_key, tie_break_keys
from metareward.prompts import (
    JUDGE_TEMPLATE,
    META_JUDGE_TEMPLATE,
    SCORE_OPTIONS,
    SCORE_PREFIX,
    WINNER_OPTIONS,
    WINNER_PREFIX,
    render_judge_prompt,
    render_meta_judge_prompt,
)


def _slots(template):
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def test_templates_have_the_spec_slots_and_verdict_formats():
    assert _slots(JUDGE_TEMPLATE) == ["prompt", "response"]
    assert _slots(META_JUDGE_TEMPLATE) == ["prompt", "response", "judgment_a", "judgment_b"]
    assert JUDGE_TEMPLATE.startswith("Review the user's question and the corresponding response using the additive 5-point")
    assert 'Conclude with the score using the format: "Score: <total points>"' in JUDGE_TEMPLATE
    assert META_JUDGE_TEMPLATE.endswith('using the format: "Winner: [Judgement A | Judgement B]"')
    assert (SCORE_PREFIX, SCORE_OPTIONS) == ("Score: ", ("0", "1", "2", "3", "4", "5"))
    assert (WINNER_PREFIX, WINNER_OPTIONS) == ("Winner: Judgement", (" A", " B"))


def test_renderers_insert_texts_verbatim_even_with_braces():
    rendered = render_judge_prompt("What is {x}?", "It is {response} {0}.")
    assert "User: What is {x}?\n<response>It is {response} {0}.</response>\n" in rendered
    meta = render_meta_judge_prompt("Q?", "R.", "JA {judgment_b}", "JB")
    assert "User: Q?\n\nResponse: R.\n\nJudgment A: JA {judgment_b}\n\nJudgment B: JB\n" in meta


def test_renderers_refuse_non_text():
    with pytest.raises(TypeError, match="response must be a str"):
        render_judge_prompt("Q", None)


def test_prompt_id_is_blake2b_of_the_exact_text():
    assert prompt_id_of("Hello") == hashlib.blake2b(b"Hello", digest_size=8).hexdigest()
    assert prompt_id_of("Hello") != prompt_id_of("Hello ")
    assert len(prompt_id_of("")) == 16


def test_tie_break_keys_are_keyed_by_seed_and_vectorised():
    ids = ["r1", "r2", "r3", 7]
    keys = tie_break_keys(3, ids)
    assert keys.dtype == np.uint64
    assert [int(k) for k in keys] == [tie_break_key(3, i) for i in ids]
    expected = int.from_bytes(hashlib.blake2b(b"r1", digest_size=8, key=b"3").digest(), "big")
    assert tie_break_key(3, "r1") == expected
    assert tie_break_key(4, "r1") != expected
    with pytest.raises(TypeError, match="seed"):
        tie_break_key("3", "r1")


def test_prepare_prompts_keeps_own_ids_or_hashes_the_text():
    own = schema.prepare_prompts(pd.DataFrame({"prompt": ["a", "b"], "prompt_id": [1, 2], "source": ["x", "y"]}))
    assert own.columns.tolist() == ["prompt_id", "prompt", "source"]
    assert own["prompt_id"].tolist() == ["1", "2"]
    hashed = schema.prepare_prompts(pd.DataFrame({"prompt": ["a", "b"]}))
    assert hashed["prompt_id"].tolist() == [prompt_id_of("a"), prompt_id_of("b")]


def test_prepare_prompts_names_duplicates_and_missing_columns():
    with pytest.raises(schema.SchemaError, match=f"'prompt_id'.*{prompt_id_of('same')!r} occurs on 2 rows"):
        schema.prepare_prompts(pd.DataFrame({"prompt": ["same", "same"]}))
    with pytest.raises(schema.SchemaError, match="missing column\\(s\\) 'prompt'"):
        schema.prepare_prompts(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(schema.SchemaError, match="column 'prompt' has 1 null"):
        schema.prepare_prompts(pd.DataFrame({"prompt": ["a", None]}))


@pytest.mark.parametrize("rho", [-0.1, 0.5, 0.7, float("nan"), "0.3", True, None])
def test_check_rho_names_the_bad_value(rho):
    with pytest.raises(schema.SchemaError, match=f"rho must be a number in \\[0, 0.5\\), got {rho!r}"):
        schema.check_rho(rho)


def test_check_rho_accepts_its_range():
    assert schema.check_rho(0) == 0.0
    assert schema.check_rho(0.4999) == 0.4999


def _judgments(**overrides):
    table = pd.DataFrame(
        {
            "prompt_id": ["p", "p", "p"],
            "response_id": ["r", "r", "s"],
            "judgment_id": ["j1", "j2", "j3"],
            "score": [4.0, None, 3.0],
            "status": ["ok", "no_score", "forced"],
        }
    )
    return table.assign(**overrides)


def test_check_judgments_accepts_a_valid_table():
    schema.check_judgments(_judgments())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"judgment_id": ["j1", "j1", "j3"]}, "column 'judgment_id' must be unique; 'j1' occurs on 2 rows"),
        ({"status": ["ok", "broken", "ok"]}, "column 'status' has value 'broken'"),
        ({"score": [4.0, 2.0, 3.0]}, "judgment_id 'j2' has status 'no_score' and score 2.0"),
        ({"score": [None, None, 3.0]}, "judgment_id 'j1' has status 'ok' and score"),
        ({"prompt_id": ["p", "q", "p"]}, "response_id 'r' appears under more than one prompt_id"),
        ({"response_id": ["r", None, "s"]}, "column 'response_id' has 1 null"),
    ],
)
def test_check_judgments_names_the_problem(overrides, message):
    with pytest.raises(schema.SchemaError, match=message.replace("(", "\\(").replace(")", "\\)")):
        schema.check_judgments(_judgments(**overrides))


def test_check_judgments_names_missing_columns():
    with pytest.raises(schema.SchemaError, match="judgments: missing column\\(s\\) 'score', 'status'"):
        schema.check_judgments(_judgments().drop(columns=["score", "status"]))
    with pytest.raises(schema.SchemaError, match="expected a pandas DataFrame, got list"):
        schema.check_judgments([1, 2])


def _meta(**overrides):
    table = pd.DataFrame(
        {
            "prompt_id": ["p", "p", "p"],
            "response_id": ["r", "r", "r"],
            "judgment_a_id": ["j1", "j2", "j1"],
            "judgment_b_id": ["j2", "j1", "j3"],
            "winner": ["A", None, "B"],
            "status": ["ok", "no_verdict", "forced"],
        }
    )
    return table.assign(**overrides)


def test_check_meta_judgments_accepts_a_valid_table():
    schema.check_meta_judgments(_meta())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"winner": ["A", None, "C"]}, "column 'winner' has value 'C'"),
        ({"winner": ["A", "B", "B"]}, "comparison ('j2', 'j1') has status 'no_verdict' and winner 'B'"),
        ({"judgment_b_id": ["j2", "j2", "j3"]}, "judgment 'j2' is compared with itself"),
        ({"judgment_a_id": ["j1", "j1", "j1"], "judgment_b_id": ["j2", "j2", "j3"]}, "('judgment_a_id', 'judgment_b_id') must be unique; ('j1', 'j2') occurs on 2 rows"),
        ({"status": ["ok", "maybe", "ok"]}, "column 'status' has value 'maybe'"),
    ],
)
def test_check_meta_judgments_names_the_problem(overrides, message):
    with pytest.raises(schema.SchemaError, match=message.replace("(", "\\(").replace(")", "\\)").replace("|", "\\|")):
        schema.check_meta_judgments(_meta(**overrides))


def test_artifact_column_lists_follow_the_data_contract():
    assert schema.JUDGMENTS_COLUMNS == ("prompt_id", "response_id", "judgment_id", "judgment", "score", "status", "finish_reason")
    assert schema.META_JUDGMENTS_COLUMNS == (
        "prompt_id", "response_id", "judgment_a_id", "judgment_b_id", "meta_judgment", "winner", "status",
    )
    assert schema.SCORES_COLUMNS == ("prompt_id", "response_id", "score_mean", "score_var", "n_valid")
    assert schema.ELO_COLUMNS == ("prompt_id", "response_id", "judgment_id", "elo")
    assert schema.PAIRS_COLUMNS[:9] == (
        "kind", "prompt_id", "prompt", "chosen", "rejected", "chosen_id", "rejected_id", "chosen_score", "rejected_score",
    )
