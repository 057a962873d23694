"""Reading a JSON object from a file with one clear error for each way it can be wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynllava.errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", hint="pass a checkpoint directory that holds config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
