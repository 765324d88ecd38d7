"""Create (or replace) the automations of `deployments/automations/*.yaml` on the Prefect server.

    .venv/bin/python deployments/automations.py --notify slack-webhook/metareward-alerts

`--notify` names a saved notification block (`BLOCK_TYPE/NAME`: Slack, Teams, email, a custom
webhook, ...; create one in the UI under Blocks, or with `prefect block create`): its id replaces
`NOTIFY_BLOCK` in the files. An automation with the same name is replaced, so running this again
after editing a file updates it. Needs `PREFECT_API_URL`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

AUTOMATIONS_DIR = Path(__file__).resolve().parent / "automations"
NOTIFY_PLACEHOLDER = "NOTIFY_BLOCK"


def load_automations(notify_block_id: str, folder: Path = AUTOMATIONS_DIR) -> list[dict]:
    """The automation specs in `folder`, with the notification block's id filled in."""
    specs = []
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for action in spec.get("actions", []):
            if action.get("block_document_id") == NOTIFY_PLACEHOLDER:
                action["block_document_id"] = notify_block_id
        specs.append(spec)
    return specs


def notify_block_id(slug: str) -> str:
    """The id of the saved block `BLOCK_TYPE/NAME`; a clear error when there is none."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    block_type, _, name = slug.partition("/")
    if not name:
        raise SystemExit(f"--notify {slug!r}: expected BLOCK_TYPE/NAME, e.g. slack-webhook/metareward-alerts")
    with get_client(sync_client=True) as client:
        try:
            return str(client.read_block_document_by_name(name=name, block_type_slug=block_type).id)
        except ObjectNotFound:
            raise SystemExit(f"--notify {slug!r}: no such block on the server (create it first: UI > Blocks)") from None


def create_automations(notify: str) -> list:
    """Create every automation of `deployments/automations/`, replacing those with the same names."""
    from prefect.automations import Automation
    from prefect.exceptions import ObjectNotFound

    created = []
    for spec in load_automations(notify_block_id(notify)):
        try:
            Automation.read(name=spec["name"]).delete()
        except (ObjectNotFound, ValueError):
            pass
        created.append(Automation.model_validate(spec).create())
    return created


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notify", required=True, help="the notification block, BLOCK_TYPE/NAME")
    args = parser.parse_args(argv)
    for automation in create_automations(args.notify):
        print(f"automation {automation.name}: {automation.id}")


if __name__ == "__main__":
    main()
