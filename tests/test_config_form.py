"""The Prefect UI's form of a deployment's parameters: every config field carries a one-line description
and every section a short one (the models' docstrings stay the full reference, for `help()` and the docs)."""

import pytest
from prefect.utilities.callables import parameter_schema

from flows.evaluate import evaluate_flow
from flows.iteration import iteration_flow
from flows.run import run_flow

MAX_MODEL_LINES = 3
MAX_MODEL_CHARS = 300


@pytest.mark.parametrize("flow", [iteration_flow, run_flow, evaluate_flow], ids=lambda flow: flow.name)
def test_every_field_of_the_parameter_form_is_described_and_no_section_is_a_wall_of_text(flow):
    definitions = parameter_schema(flow.fn).model_dump_for_openapi()["definitions"]
    assert "RunConfig" in definitions
    problems = []
    for model, definition in sorted(definitions.items()):
        description = definition.get("description", "")
        if not description.strip():
            problems.append(f"{model}: no description")
        elif len(description.splitlines()) > MAX_MODEL_LINES or len(description) > MAX_MODEL_CHARS:
            problems.append(
                f"{model}: description of {len(description.splitlines())} lines, {len(description)} characters "
                f"(at most {MAX_MODEL_LINES} and {MAX_MODEL_CHARS}; the docstring keeps the full reference)"
            )
        for field, schema in definition.get("properties", {}).items():
            if not schema.get("description", "").strip():
                problems.append(f"{model}.{field}: no description (Field(description=...))")
            elif "\n" in schema["description"]:
                problems.append(f"{model}.{field}: description of more than one line")
    assert not problems, f"{flow.name}'s parameter form:\n" + "\n".join(problems)
