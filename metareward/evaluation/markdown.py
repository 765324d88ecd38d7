"""The evaluation of one iteration as markdown (`evaluation_markdown`): what `metareward evaluate` prints."""

from __future__ import annotations

from typing import Any, Sequence

from metareward.schema import STATUS_FORCED


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def evaluation_markdown(run: str, iteration: int, win_rate: dict[str, Any] | None, accuracy: Sequence[dict[str, Any]]) -> str:
    """The evaluation of one iteration as markdown: win rate and LC win rate with their intervals,
    verdict counts, then the judge accuracy of each model."""
    lines = [f"# Evaluation of {run}, iteration {iteration}", ""]
    if win_rate is not None:
        level = f"{100 * win_rate['confidence']:.0f}%"
        lines += [
            "## Win rate of X against Y on the held-out prompts",
            "",
            f"X: `{win_rate['model_x']}` (sha256 `{win_rate['model_x_sha256'][:12]}`), "
            f"Y: `{win_rate['model_y']}` (sha256 `{win_rate['model_y_sha256'][:12]}`), "
            f"judge: `{win_rate['judge']}` ({win_rate['judge_backend']}, sha256 `{win_rate['judge_sha256'][:12]}`)",
            "",
            f"| what | estimate | {level} interval (bootstrap over prompts) |",
            "|---|---|---|",
            f"| win rate | {_percent(win_rate['win_rate'])} | {_percent(win_rate['win_rate_low'])} - {_percent(win_rate['win_rate_high'])} |",
            f"| length-controlled win rate | {_percent(win_rate['lc_win_rate'])} | {_percent(win_rate['lc_low'])} - {_percent(win_rate['lc_high'])} |",
            "",
            "| count | value |",
            "|---|---|",
            f"| prompts | {win_rate['prompts']} |",
            f"| comparisons (both orders) | {win_rate['comparisons']} |",
            f"| decided | {win_rate['decided']} |",
            *[f"| verdicts {status} | {count} |" for status, count in win_rate["statuses"].items()],
            f"| X wins / Y wins | {win_rate['x_wins']} / {win_rate['y_wins']} |",
            f"| prompts X won in both orders / split / Y won in both | {win_rate['prompts_x_won_both']} / {win_rate['prompts_split']} / {win_rate['prompts_y_won_both']} |",
            f"| verdicts for Response A (position bias) | {_percent(win_rate['verdicts_for_a'])} |",
            f"| mean length X / Y (characters) | {win_rate['mean_x_chars']:.0f} / {win_rate['mean_y_chars']:.0f} |",
            "",
        ]
    if accuracy:
        lines += [
            "## Judge accuracy on the preference set",
            "",
            "| model | role | pairs | scored | accuracy | wrong | ties | forced judgments |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in accuracy:
            lines.append(
                f"| `{row['model']}` | {row['role']} | {row['pairs']} | {row['scored_pairs']} | {_percent(row['accuracy'])} | "
                f"{_percent(row['wrong_share'])} | {_percent(row['tie_share'])} | {row['statuses'].get(STATUS_FORCED, 0)} |"
            )
        lines.append("")
    return "\n".join(lines)
