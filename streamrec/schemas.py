"""JSON Schema files for the contracts in streamrec.events; schemas/ in the repo is their output."""

from __future__ import annotations

import json
from pathlib import Path

from streamrec.events import json_schemas


def render_schemas() -> dict[str, str]:
    """File name -> file text, exactly as `streamrec schemas export` writes them."""
    return {
        f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in json_schemas().items()
    }


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_schemas().items():
        path = out / name
        path.write_text(text)
        paths.append(path)
    return paths
