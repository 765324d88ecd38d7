"""deployments/k8s/gpu-job-template.json: a Kubernetes work pool base job template whose pod asks for
GPUs, lands on GPU nodes and reports to the Prefect API, each through a variable of the template."""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "deployments" / "k8s" / "gpu-job-template.json"


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _pod_spec(template: dict) -> dict:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


def test_the_pod_requests_and_limits_the_gpus_variable_defaulting_to_eight():
    template = _template()
    resources = _pod_spec(template)["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    gpus = template["variables"]["properties"]["gpus"]
    assert gpus["type"] == "integer" and gpus["default"] == 8

    from prefect.utilities.templating import apply_values

    rendered = apply_values(template["job_configuration"], {"gpus": 8, "tolerations": [], "node_selector": {}})
    assert _pod_spec({"job_configuration": rendered})["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 8


def test_node_selector_and_tolerations_are_variables_that_tolerate_the_gpu_taint():
    template = _template()
    pod = _pod_spec(template)
    assert pod["nodeSelector"] == "{{ node_selector }}"
    assert pod["tolerations"] == "{{ tolerations }}"
    properties = template["variables"]["properties"]
    assert properties["node_selector"]["type"] == "object"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in properties["tolerations"]["default"]


def test_every_placeholder_names_a_declared_variable_and_the_worker_fields_are_there():
    template = _template()
    configuration = template["job_configuration"]
    assert configuration["env"]["PREFECT_API_URL"] == "{{ prefect_api_url }}"
    container = _pod_spec(template)["containers"][0]
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    # the fields the Kubernetes worker's job configuration reads
    assert {"command", "env", "labels", "name", "namespace", "job_manifest", "cluster_config"} <= set(configuration)

    from prefect.utilities.templating import find_placeholders

    used = {placeholder.name for placeholder in find_placeholders(configuration)}
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])
