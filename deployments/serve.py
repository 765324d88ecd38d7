"""The deployments of `deployments/prefect.yaml`, served by this process (one machine, no worker).

    .venv/bin/python deployments/serve.py [--config configs/demo.yaml] [--timezone Europe/Berlin] [--cron "0 2 * * *"]

Needs a Prefect server (`PREFECT_API_URL`; `make serve` starts one on 127.0.0.1). Registers

- `metareward-run/meta-rewarding-iteration`: one more iteration of the run (`run_flow` with
  `max_new_iterations=1`), started by hand from the UI; its parameters are the run's config,
  shown as a form with the values of `--config` as defaults;
- `metareward-run/meta-rewarding-nightly`: the same at `--cron` in `--timezone` (default
  `$METAREWARD_NIGHTLY_TZ`, else UTC), with `if_busy="skip"`: when another flow run still works
  on the run, tonight's ends at once and changes nothing;
- `metareward-evaluate/evaluate`: the evaluation of the run (`flows/evaluate.py`).

and runs their flow runs in child processes until stopped (Ctrl-C; stopping pauses the nightly
schedule, as `serve` does). Flow runs send heartbeats every `HEARTBEAT_S` seconds, which the
crash automation of `deployments/automations/` watches (docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ITERATION = "meta-rewarding-iteration"
NIGHTLY = "meta-rewarding-nightly"
EVALUATE = "evaluate"
NIGHTLY_CRON = "0 2 * * *"
HEARTBEAT_S = 30
TAGS = ["metareward"]


def build_deployments(config, timezone: str, cron: str = NIGHTLY_CRON) -> list:
    """The three deployments for the run `config` (a `RunConfig`)."""
    from prefect.schedules import Cron

    from flows.evaluate import evaluate_flow
    from flows.run import run_flow

    run_parameters = {"config": config.model_dump(mode="json"), "max_new_iterations": 1}
    return [
        run_flow.to_deployment(
            name=ITERATION,
            parameters=run_parameters,
            description="One more iteration of the run, from its latest checkpoint (waits while another flow run works on it).",
            tags=TAGS,
        ),
        run_flow.to_deployment(
            name=NIGHTLY,
            schedule=Cron(cron, timezone=timezone),
            parameters={**run_parameters, "if_busy": "skip"},
            description="Nightly: one more iteration of the run up to max_iterations; skipped while another flow run works on it.",
            tags=TAGS + ["nightly"],
        ),
        evaluate_flow.to_deployment(
            name=EVALUATE,
            parameters={"config": config.model_dump(mode="json")},
            description="Evaluate the run's checkpoints on its held-out prompts.",
            tags=TAGS,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="the run's YAML config (the deployments' default parameters)")
    parser.add_argument("--timezone", default=os.environ.get("METAREWARD_NIGHTLY_TZ", "UTC"), help="time zone of the nightly schedule (IANA name)")
    parser.add_argument("--cron", default=NIGHTLY_CRON, help="the nightly schedule")
    args = parser.parse_args(argv)

    # Read by Prefect when it starts the flow runs' processes (they inherit this environment).
    os.environ.setdefault("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "metareward")
    sys.path.insert(0, str(REPO))
    from prefect import serve

    from metareward.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    serve(*build_deployments(config, args.timezone, args.cron))


if __name__ == "__main__":
    main()
