"""metareward: Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594) as Prefect 3 flows.

The core (prompts, parsing, scoring, pairs, meta) is pure pandas/numpy; engines, training and the
Prefect flows import their heavy dependencies lazily, so `import metareward` stays light.
"""

__version__ = "0.1.0"
