"""The `sparsekit` command line: `python -m sparsekit train|demo|backends|toys`."""
from __future__ import annotations

import sys

COMMANDS = {
    "demo": "train a small TopK dictionary on synthetic sparse data and report what it recovers",
    "backends": "print which implementation runs the ops on each device",
    "train": "train a dictionary on activations on disk (.npy/.safetensors/shards): --config cfg.yaml or flags",
    "toys": "toy studies with known answers: `toys attention` (attention-head superposition)",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m sparsekit <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}")
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main
        demo_main(rest)
    elif command == "train":
        from .train_cli import main as train_main
        train_main(rest)
    elif command == "toys":
        from .toys_cli import main as toys_main
        toys_main(rest)
    elif command == "backends":
        from .backend import backends
        print(backends())
    else:
        print(f"sparsekit: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
