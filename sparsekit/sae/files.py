"""A saved dictionary's folder: its file names and the checked JSON reader every format shares."""
from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def read_json_object(config_path: Path) -> dict:
    """A JSON file that must hold an object (cfg.json); anything else is a ValueError naming the file."""
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config

