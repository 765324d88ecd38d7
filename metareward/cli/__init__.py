"""The `metareward` command (`metareward.cli.application` for now; split into command groups next)."""

from metareward.cli.application import app

__all__ = ["app"]
