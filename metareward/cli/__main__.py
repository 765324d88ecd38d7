"""`python -m metareward.cli`: the `metareward` command."""

from metareward.cli import app

app()
