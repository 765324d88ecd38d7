"""The judge and meta-judge prompts of the method (docs/method.md), verbatim, and their renderers.

JUDGE_TEMPLATE is the Self-Rewarding additive 5-point rubric (Yuan et al. 2024), reused by the
paper; META_JUDGE_TEMPLATE is the paper's Figure 2. Each is the text of one user turn. The verdict
prefixes and options are what the `forced` verdict mode appends after a rationale: the model
continues `rationale + SCORE_PREFIX` with one of SCORE_OPTIONS, or `rationale + WINNER_PREFIX`
with one of WINNER_OPTIONS (note the paper's spelling "Judgement" in the verdict and "Judgment"
in the slot labels).
"""

from __future__ import annotations

JUDGE_TEMPLATE = """Review the user's question and the corresponding response using the additive 5-point
scoring system described below. Points are accumulated based on the satisfaction of each
criterion:
- Add 1 point if the response is relevant and provides some information related to
the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,
addressing the user's question directly and comprehensively, and is well-organized and
helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as
necessary. To evaluate the response in alignment with this additive scoring model, we'll
systematically attribute points based on the outlined criteria."""
"""Slots: {prompt}, {response}."""

META_JUDGE_TEMPLATE = """Review the user's question and the corresponding response, along with two judgments.
Determine which judgment is more accurate according to the rubric provided below. The
rubric used for the initial judgments is as follows:
- Add 1 point if the response is relevant and provides some information related to
the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,
addressing the user's question directly and comprehensively, and is well-organized and helpful,
even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}

Response: {response}

Judgment A: {judgment_a}

Judgment B: {judgment_b}

After examining the original question, response, and both judgments:
- Explain which judgment is more accurate according to the original rubric and why.
Consider factors such as adherence to the rubric, accuracy in evaluating the response, and
consistency in applying the criteria.
- Conclude with a clear statement of which judgment is better using the format: "Winner: [Judgement A | Judgement B]\""""
"""Slots: {prompt}, {response}, {judgment_a}, {judgment_b}."""

SCORE_PREFIX = "Score: "
SCORE_OPTIONS = ("0", "1", "2", "3", "4", "5")
WINNER_PREFIX = "Winner: Judgement"
WINNER_OPTIONS = (" A", " B")
WINNER_OF_OPTION = {" A": "A", " B": "B"}
"""The `winner` value ('A' or 'B') of each forced option."""


def render_judge_prompt(prompt: str, response: str) -> str:
    """The judge's user turn for one (prompt, response). Slot values are inserted as they are:
    braces or template text inside them are never interpreted."""
    return JUDGE_TEMPLATE.format(prompt=_text("prompt", prompt), response=_text("response", response))


def render_meta_judge_prompt(prompt: str, response: str, judgment_a: str, judgment_b: str) -> str:
    """The meta-judge's user turn comparing two judgments of one (prompt, response)."""
    return META_JUDGE_TEMPLATE.format(
        prompt=_text("prompt", prompt),
        response=_text("response", response),
        judgment_a=_text("judgment_a", judgment_a),
        judgment_b=_text("judgment_b", judgment_b),
    )


def _text(slot: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{slot} must be a str, got {type(value).__name__}: {value!r}")
    return value
