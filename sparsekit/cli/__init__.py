"""The `sparsekit` command line: `python -m sparsekit train|demo|mnist|backends|toys|tune`, `--version`."""
from __future__ import annotations

import os
import sys

from sparsekit._util.version import VERSION

from .parser import list_commands_if_asked

COMMANDS = {
    "demo": "the compact MNIST study (runs/mnist-demo/report.html); --synthetic: a TopK dictionary on planted data",
    "mnist": "dictionaries on an MNIST MLP's hidden layer: scan, elbows, features, report (--scan compact|full)",
    "backends": "print which implementation runs the ops on each device",
    "train": "train a dictionary on activations on disk (.npy/.safetensors/shards): --config cfg.yaml or flags",
    "toys": "toy studies: `toys attention` (attention-head superposition), `toys sparse-base` (L1-sparse 1-layer LMs)",
    "lm-demo": "SmolLM2-135M: cache early-layer activations, train an SAE and a transcoder (--transcoder "
               "mlp|resid|attn; --layers 0,2,4: per-layer SAEs), CE/KL, dashboard",
    "train-clt": "SmolLM2-135M: a cross-layer transcoder over consecutive layers (--layers 3-8), per-layer FVU",
    "graph": "the attribution graph of a prompt under a train-clt run's CLT: graph.json and graph.html (--run runs/clt)",
    "dashboard": "write RUN_DIR/dashboard.html (static feature dashboard) from RUN_DIR/*_features.json",
    "lm-study": "SmolLM2-135M studies of the note's claims: `lm-study dead-latents` (dead fraction vs size per remedy)",
    "tune": "measure this CPU's crossovers (OpenBLAS, bf16 screen) and cache them; --quick, --show, --reset",
}


def version_lines() -> list:
    """What `--version` prints: the package, the C++ kernels' instruction-set level and why, the
    backends, torch and Python."""
    import platform

    import torch

    from sparsekit.ops.backend import CPP_IMPORT_ERROR, CPP_ISA, CPP_REFUSED, CPU_ISA_LEVELS
    from sparsekit.ops.cpu.isa import ISA_ENV
    if CPP_ISA is not None:
        forced = f"forced by {ISA_ENV}" if os.environ.get(ISA_ENV, "").strip() else f"{ISA_ENV} forces a lower one"
        kernels = f"{CPP_ISA} (this CPU runs {', '.join(CPU_ISA_LEVELS)}; {forced})"
    elif CPP_REFUSED:
        kernels = f"refused: {CPP_IMPORT_ERROR} (CPU ops raise until that is fixed)"
    else:
        kernels = f"not loaded ({CPP_IMPORT_ERROR}); CPU ops run the PyTorch reference"
    return [f"sparsekit {VERSION}", f"C++ kernels: {kernels}",
            f"torch {torch.__version__}, Python {platform.python_version()} on {platform.machine()}"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        print("\n".join(version_lines()))
        return
    list_commands_if_asked(argv, "python -m sparsekit <command> [options] | --version", "commands", COMMANDS)
    from sparsekit._util.extras import MissingExtra
    from sparsekit.errors import BackendUnavailable
    try:
        run_command(argv[0], argv[1:])
    except MissingExtra as missing:  # an optional dependency: one line naming its extra, no traceback
        print(missing, file=sys.stderr)
        raise SystemExit(2) from None
    except BackendUnavailable as error:  # SPARSEKIT_BACKEND / SPARSEKIT_ISA: one line, no traceback
        print(f"sparsekit: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run_command(command: str, rest: list) -> None:
    """Run one command of COMMANDS with its arguments."""
    if command == "demo":
        from .demo import main as demo_main
        demo_main(rest)
    elif command == "mnist":
        from .mnist import main as mnist_main
        mnist_main(rest)
    elif command == "train":
        from sparsekit.training.parallel.data import init_distributed, launched_by_torchrun, shutdown_distributed

        from .train import main as train_main
        if launched_by_torchrun():  # join the group first: each rank then builds on its own GPU
            init_distributed()
        train_main(rest)
        shutdown_distributed()
    elif command == "toys":
        from .toys import main as toys_main
        toys_main(rest)
    elif command == "train-clt":
        from .train_clt import main as train_clt_main
        train_clt_main(rest)
    elif command == "graph":
        from .graph import main as graph_main
        graph_main(rest)
    elif command == "dashboard":
        from .dashboard import main as dashboard_main
        dashboard_main(rest)
    elif command == "lm-demo":
        from .lm import main as lm_demo_main
        lm_demo_main(rest)
    elif command == "lm-study":
        from .lm_study import main as lm_study_main
        lm_study_main(rest)
    elif command == "tune":
        from .tune import main as tune_main
        tune_main(rest)
    elif command == "backends":
        from sparsekit.ops.backend import backends
        print(backends())
    else:
        print(f"sparsekit: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
