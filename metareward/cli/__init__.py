"""The `metareward` command.

    metareward run CONFIG [--refresh]              iterations of a run, resuming after the last complete one
    metareward iterate CONFIG [--iteration I]      exactly one more iteration (or iteration I again)
    metareward status RUN [--root ROOT]            one line per iteration: checkpoint, counts, metrics
    metareward show RUN [--root ROOT]              status, then every stage of every iteration
    metareward report RUN [--root ROOT]            diagnostics across iterations: {run}/report/report.md (+ Prefect artifact)
    metareward evaluate CONFIG [--iteration I]     win rate of M_i vs M_{i-1} on held-out prompts, judge accuracy
    metareward seed                                the embedded seed model's ModelRef (converted once)
    metareward plan CONFIG [--tokens-per-second X] [--gpus N]   expected tokens and hours per iteration, before renting GPUs
    metareward approve RUN --iteration I --gate G [--reject] [--reason TEXT]   answer a gate that waits (Prefect server)

RUN is a run's config file or its name (then `--root`, default `./runs`, says where it is stored).

The modules: `application` (the typer `app`, re-exported here, and what the commands share),
`running` (run, iterate), `reading` (status, show), `measuring` (evaluate, report) and
`preparing` (seed, plan) and `approving` (approve). `python -m metareward.cli` runs the command (`__main__`).
"""

# Importing a command group registers its commands on `app`, and `metareward --help` lists them in
# the order they were registered: keep these imports in this order.
# isort: off
from metareward.cli import running  # noqa: F401
from metareward.cli import reading  # noqa: F401
from metareward.cli import measuring  # noqa: F401
from metareward.cli import preparing  # noqa: F401
from metareward.cli import approving  # noqa: F401
# isort: on
from metareward.cli.application import app

__all__ = ["app"]
