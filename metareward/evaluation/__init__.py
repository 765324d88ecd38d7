"""Evaluation: is M_i better than M_{i-1}, and does its judging get better or worse? Plain functions.

The modules, one concern each (their public names are re-exported here):
- `comparisons`: the win rate's responses and the judge's comparisons of them in both orders, with
  `COMPARISON_TEMPLATE` and its verdict parser.
- `heldout`: the held-out prompts, checked against every prompt sampled for training.
- `stats`: win rate and length-controlled win rate with bootstrap intervals (`win_rate_summary`).
- `accuracy`: the preference set and the judge accuracy on it.
- `evaluate`: `evaluate_win_rate`, `evaluate_judge_accuracy`, their artifacts and `EngineSlot`.
- `markdown`: `evaluation_markdown`.

docs/evaluation.md documents all of this.
"""

from metareward.evaluation.accuracy import (
    EMBEDDED,
    EMBEDDED_PREFERENCE_SET,
    JUDGMENT_STATUSES,
    PREFERENCE_COLUMNS,
    PreferenceSetError,
    judge_accuracy,
    judge_preference_set,
    load_preference_set,
    preference_set_digest,
)
from metareward.evaluation.comparisons import (
    COMPARISONS_COLUMNS,
    COMPARISON_STATUSES,
    COMPARISON_TEMPLATE,
    MODEL_X,
    MODEL_Y,
    ORDER_X_FIRST,
    ORDER_Y_FIRST,
    VERDICT_OPTIONS,
    VERDICT_PREFIX,
    compare_responses,
    generate_responses,
    parse_comparison_verdict,
    render_comparison_prompt,
    winner_of,
)
from metareward.evaluation.evaluate import (
    COMPARISONS,
    EVALUATION_DIR,
    JUDGE_ACCURACY,
    POST_EVALUATION_CHECKS,
    PREFERENCE_JUDGMENTS,
    RESPONSES,
    WIN_RATE,
    EngineFor,
    EngineSlot,
    evaluate_checks,
    evaluate_judge_accuracy,
    evaluate_win_rate,
    evaluation_uri,
)
from metareward.evaluation.heldout import HeldOutOverlapError, check_heldout, heldout_eval_prompts, training_prompts
from metareward.evaluation.markdown import evaluation_markdown
from metareward.evaluation.stats import (
    LOGISTIC_L2,
    WinRateEstimate,
    fit_logistic,
    length_controlled_win_rate,
    win_rate_summary,
)

__all__ = [
    "COMPARISONS",
    "COMPARISONS_COLUMNS",
    "COMPARISON_STATUSES",
    "COMPARISON_TEMPLATE",
    "EMBEDDED",
    "EMBEDDED_PREFERENCE_SET",
    "EVALUATION_DIR",
    "JUDGE_ACCURACY",
    "JUDGMENT_STATUSES",
    "LOGISTIC_L2",
    "MODEL_X",
    "MODEL_Y",
    "ORDER_X_FIRST",
    "ORDER_Y_FIRST",
    "PREFERENCE_COLUMNS",
    "POST_EVALUATION_CHECKS",
    "PREFERENCE_JUDGMENTS",
    "RESPONSES",
    "VERDICT_OPTIONS",
    "VERDICT_PREFIX",
    "WIN_RATE",
    "EngineFor",
    "EngineSlot",
    "HeldOutOverlapError",
    "PreferenceSetError",
    "WinRateEstimate",
    "check_heldout",
    "compare_responses",
    "evaluate_checks",
    "evaluate_judge_accuracy",
    "evaluate_win_rate",
    "evaluation_markdown",
    "evaluation_uri",
    "fit_logistic",
    "generate_responses",
    "heldout_eval_prompts",
    "judge_accuracy",
    "judge_preference_set",
    "length_controlled_win_rate",
    "load_preference_set",
    "parse_comparison_verdict",
    "preference_set_digest",
    "render_comparison_prompt",
    "training_prompts",
    "win_rate_summary",
    "winner_of",
]
