"""`python -m sparsekit train`: train a sparse dictionary on activations stored on disk, or computed
from a language model over a text dataset.

    python -m sparsekit train --data acts/ --n-latents 4096 --k 32 --checkpoint-dir runs/a
    python -m sparsekit train --config cfg.yaml --lr 1e-3          # flags override the file
    python -m sparsekit train --config cfg.yaml --resume           # continue from runs/a's newest checkpoint
    python -m sparsekit train --model smollm2-135m --dataset corpus/ --hook blocks.3.hook_resid_post \\
        --n-latents 4096 --k 32 --total-tokens 2e6 --out runs/l3   # text -> trained, evaluated dictionary

--model/--dataset (instead of --data): smollm2-135m (TransformerLens hook names) or a local Hugging
Face model folder (dotted module paths, ':input' for what a module receives) run over .txt, .jsonl,
.parquet files or a datasets.save_to_disk folder, tokenised into --context-len contexts; the first
--eval-contexts contexts are held out for the final evaluation (CE loss recovered and KL when
spliced, FVU, L0, dead latents) and the feature report; the run folder --out gets the dictionary,
metrics.json, <name>_features.json and dashboard.html (sparsekit.cli.train_lm).

--data is a shard folder (manifest.json, see sparsekit.activations.write_shards), a .npy file [N, d],
or a .safetensors file holding "x" [N, d] (and "y" [N, d_out]: then a transcoder is trained);
--targets adds transcoder targets [N, d_out] to a .npy --data.

--config reads a YAML mapping whose keys are the flags' names with underscores (n_latents: 4096,
dead_strategy: auxk, data: acts/); relative paths are relative to the working directory. Every
TrainConfig field has a flag; tuples are comma-separated (--adam-betas 0.9,0.999) and optional
settings take "none" (--grad-clip-norm none).

The trained dictionary is saved with sae.save to --out (default: <checkpoint_dir or output_dir>/final);
metrics.jsonl and feature_density.png go to --output-dir (default: the checkpoint folder, else --out).
With --checkpoint-dir and no --checkpoint-every-tokens, a checkpoint is written every 10% of the run.

Bad input exits with status 2 and one line on stderr starting with "sparsekit train: ".
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
from pathlib import Path

from sparsekit._util.bounded import RefusedFile, check_path_length, load_yaml

from .parser import IntBeyond64Bits, beyond_64_bits, check_int64, quoted, too_many_digits
from .train_common import (
    PROG,
    TrainingError,
    UsageError,
    architecture_names,
    failure_line,
    hyperparameter_flags,
    make_dictionary,
    prepare,
    say,
    train_and_save,
)


def _hyperparameter_option(spec, takes: tuple, needs: tuple) -> "Option":
    if needs:
        text = f"{spec.help} ({', '.join(takes)}); required for {'it' if len(takes) == 1 else 'them'}"
    else:
        text = f"{spec.help} ({', '.join(takes)}; default {spec.default:g})"
    if spec.kind is tuple:
        return Option(spec.name, "tuple", text, element="int" if spec.element is int else "float")
    return Option(spec.name, "int" if spec.kind is int else "float", text)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting, given as --flag-name on the command line or flag_name: in the YAML config."""
    name: str
    kind: str                  # "int" | "float" | "str" | "path" | "paths" | "bool" | "switch" | "tuple"
    help: str
    optional: bool = False     # None ("none" on the command line, null in YAML) is allowed
    element: str = "float"     # a tuple's element kind
    length: int | None = None  # a tuple's required length
    default: object = None     # shown in --help only

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _options() -> list[Option]:
    """The run's own options, then one option per TrainConfig field (generated from the dataclass)."""
    from sparsekit.training.config import TrainConfig, field_help

    options = [
        Option("data", "path", "activations: a shard folder (manifest.json), a .npy file [N, d] or a .safetensors "
                               "file with 'x' [N, d] (and 'y' [N, d_out] for a transcoder)"),
        Option("targets", "path", "transcoder targets [N, d_out] as a .npy file, when --data is a .npy file"),
        Option("architecture", "str", f"dictionary architecture: {', '.join(architecture_names())} (default topk)"),
        Option("n_latents", "int", "number of latents (dictionary width); required"),
        *(_hyperparameter_option(*facts) for facts in hyperparameter_flags().values()),
        Option("transcoder", "switch", "train a transcoder (implied when the data has targets; an error without)"),
        Option("skip", "switch", "a skip transcoder: a linear path x @ W_skip beside the dictionary (needs targets)"),
        Option("device", "str", "where to train: auto (cuda when available), cpu, cuda, cuda:1, ... (default auto)"),
        Option("out", "path", "folder for the trained dictionary (default: <checkpoint_dir or output_dir>/final)"),
        Option("resume", "switch", "continue from the newest checkpoint in --checkpoint-dir (fresh start if none)"),
        Option("latent_parallel", "int", "under torchrun: split the latents over this many ranks (topk, batchtopk, "
                                       "relu); the world size must be a multiple, the rest is data parallel "
                                       "(a 2-D mesh; default 1: data parallel only)"),
        *lm_options(),
    ]
    for field in dataclasses.fields(TrainConfig):
        names = _type_names(field.type)
        optional = "None" in names
        default = field.default
        help_text = f"{field_help(field.name)} (TrainConfig.{field.name}; default {_show(default)})"
        if "tuple" in names:
            help_text += ", comma-separated"
        if optional and field.name != "checkpoint_every_tokens" and not field.name.endswith("_dir"):
            help_text += "; none to unset"
        if field.name == "checkpoint_every_tokens":
            help_text = (f"{field_help(field.name)} (TrainConfig.checkpoint_every_tokens; default with --checkpoint-dir: "
                         f"10%% of --total-tokens)")
        if "bool" in names:
            options.append(Option(field.name, "bool", help_text, default=default))
        elif "int" in names:
            options.append(Option(field.name, "int", help_text, optional, default=default))
        elif "float" in names:
            options.append(Option(field.name, "float", help_text, optional, default=default))
        elif "tuple" in names:
            element = ("int" if field.name.endswith("_tokens")
                       else "int" if isinstance(default, tuple) and default and isinstance(default[0], int)
                       else "float")
            length = len(default) if isinstance(default, tuple) else None
            options.append(Option(field.name, "tuple", help_text, optional, element, length, default))
        elif field.name.endswith("_dir"):
            options.append(Option(field.name, "path", help_text, optional, default=default))
        else:
            options.append(Option(field.name, "str", help_text, optional, default=default))
    return options


def _type_names(annotation) -> set[str]:
    """'float | None' (or the type itself) -> {'float', 'None'}."""
    if isinstance(annotation, str):
        return {part.strip().replace("NoneType", "None") for part in annotation.replace("Optional[", "").rstrip("]")
                .split("|")}
    if annotation is type(None):
        return {"None"}
    args = getattr(annotation, "__args__", None)
    if args:
        return set().union(*(_type_names(a) for a in args))
    return {getattr(annotation, "__name__", str(annotation))}


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def lm_options() -> list[Option]:
    """The options of training from a model and a text dataset (--model/--dataset; see train_lm)."""
    return [
        Option("model", "str", "instead of --data: a language model to take activations from: smollm2-135m or a "
                               "local Hugging Face model folder (read offline)"),
        Option("dataset", "paths", "with --model: text to run it on: .txt, .jsonl and .parquet files, folders of "
                                   "them, or a folder written by datasets' save_to_disk (one or more)"),
        Option("hook", "str", "with --model: the activation to train on (a transcoder's target): a TransformerLens "
                              "hook name for smollm2-135m (blocks.3.hook_resid_post), a module path for a "
                              "Hugging Face model (model.layers.3.mlp, model.layers.3.mlp:input)"),
        Option("input_hook", "str", "with --model: a transcoder's input activation (it reads this and predicts "
                                    "--hook's); implies --transcoder"),
        Option("text_field", "str", "the field holding the text in .jsonl records, .parquet and datasets columns "
                                    "(default text)"),
        Option("document_per_line", "switch", "each non-empty line of a .txt file is a document (default: each file "
                                              "is one)"),
        Option("context_len", "int", "tokens per context, BOS first (default 128)"),
        Option("eval_contexts", "int", "contexts held out (the first ones) for the final evaluation and the feature "
                                       "report (default 32)"),
        Option("cache", "path", "cache the training activations as shards in this folder (reused when the model, "
                                "hooks and text match) instead of streaming them"),
        Option("cache_dtype", "str", "the cached shards' dtype: float32, float16 or bfloat16 (half the disk; "
                                     "training converts each batch to float32; default float32)"),
        Option("exclude_special_tokens", "bool", "drop positions holding a special token (BOS, EOS, pad, ...) "
                                                 "anywhere in a context from training, evaluation and the report; "
                                                 "position 0 is always dropped (default on)", default=True),
    ]


# --- converting values -------------------------------------------------------------------------

_EXPECTED = {"int": "an int", "float": "a number", "str": "a string", "path": "a path (string)",
             "paths": "a path or a list of paths", "bool": "true or false", "switch": "true or false"}


def expected_type(option: Option, yaml: bool) -> str:
    if option.kind == "tuple":
        items = "ints" if option.element == "int" else "numbers"
        count = f"{option.length} " if option.length else ""
        text = f"a list of {count}{items}" if yaml else f"{count}comma-separated {items}"
    else:
        text = _EXPECTED[option.kind]
    return text + (" or none" if option.optional else "")


STR_LIMIT = 4096  # characters in a string option (architecture, device, hook, model and run names)


def _to_int(value):
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        too_long = too_many_digits(text)  # before int(), which refuses over 4,300 digits
        if too_long is not None:
            raise too_long
        try:
            return int(text)
        except ValueError:
            number = float(text)  # 1e7, 10_000_000.0
            if number.is_integer():
                return int(number)
    raise TypeError


def _to_float(value):
    if isinstance(value, bool):
        raise TypeError
    number = float(value.strip()) if isinstance(value, str) else value
    if not isinstance(number, (int, float)) or not math.isfinite(number):
        raise TypeError
    return float(number)


def convert(option: Option, value, where: str, yaml: bool):
    """A command-line string or a YAML value -> the option's type; UsageError naming `where` otherwise.
    (PyYAML reads 3e-4 as a string, so numbers are accepted as strings in YAML too.) Every int must fit
    in 64 bits and every path on a file system (``check_int64``, ``check_path_length``), so such values
    are refused here, with their flag or key named, before anything uses them."""
    if option.optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    try:
        result = _converted(option, value)
        if option.kind == "int" or (option.kind == "tuple" and option.element == "int"):
            for number in (result if option.kind == "tuple" else (result,)):
                check_int64(number)
        if option.kind in ("path", "paths"):
            for path in (result if option.kind == "paths" else (result,)):
                check_path_length(path, where)
        if option.kind == "str" and len(result) > STR_LIMIT:  # a name, never a document
            raise UsageError(f"{where}: a string of {len(result):,} characters is longer than any value it takes "
                             f"(at most {STR_LIMIT:,})")
        return result
    except IntBeyond64Bits as error:
        raise UsageError(beyond_64_bits(where, error)) from None
    except RefusedFile as error:
        raise UsageError(str(error)) from None
    except (TypeError, ValueError, OverflowError):
        pass
    raise UsageError(f"{where} must be {expected_type(option, yaml)}, got {quoted(value)}")


def _converted(option: Option, value):
    if option.kind == "int":
        return _to_int(value)
    if option.kind == "float":
        return _to_float(value)
    if option.kind in ("str", "path"):
        if not isinstance(value, str) or (option.kind == "path" and not value.strip()):
            raise TypeError
        return value
    if option.kind in ("bool", "switch"):
        if not isinstance(value, bool):
            raise TypeError
        return value
    if option.kind == "paths":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or \
                not all(isinstance(item, str) and item.strip() for item in items):
            raise TypeError
        return [str(item) for item in items]
    if option.kind == "tuple":
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (int, float)) and not isinstance(items, bool):
            items = [items]
        if not isinstance(items, (list, tuple)) or not items:
            raise TypeError
        result = tuple((_to_int if option.element == "int" else _to_float)(item) for item in items)
        if option.length is not None and len(result) != option.length:
            raise TypeError
        return result
    raise TypeError


# --- the command line and the config file --------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with every error as one "sparsekit train: ..." line and exit status 2."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            known = [s for action in self._actions for s in action.option_strings]
            hints = []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                if flag.startswith("-"):
                    close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
                    if close:
                        hints.append(f"{flag}: did you mean {' or '.join(close)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        raise UsageError(message)


def build_parser(options: list[Option] | None = None) -> argparse.ArgumentParser:
    options = options or _options()
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="CFG.yaml", help="YAML file of settings (keys: the flags' names with "
                                                             "underscores); flags on the command line override it")
    for option in options:
        if option.kind == "switch":
            parser.add_argument(option.flag, dest=option.name, action="store_true", help=option.help)
        elif option.kind == "bool":
            parser.add_argument(option.flag, dest=option.name, action=argparse.BooleanOptionalAction,
                                help=option.help)
        elif option.kind == "paths":
            parser.add_argument(option.flag, dest=option.name, metavar="PATH", nargs="+", help=option.help)
        else:
            metavar = {"int": "N", "float": "X", "path": "PATH", "tuple": "A,B"}.get(option.kind, "NAME")
            parser.add_argument(option.flag, dest=option.name, metavar=metavar, help=option.help)
    return parser


CONFIG_MAX_BYTES = 2**20  # a config of settings is a few hundred bytes


def read_config(path: str, options: dict[str, Option]) -> dict:
    """The YAML file's settings, checked: unknown keys and wrong types name the key. The file is read
    through ``sparsekit._util.bounded.load_yaml``: a regular file of at most CONFIG_MAX_BYTES, no
    anchors or aliases, no deep nesting."""
    import yaml

    file = Path(path)
    try:
        check_path_length(path, "--config")
        if not file.exists() or file.is_dir():  # a pipe or a device is refused by load_yaml
            raise UsageError(f"--config {path}: {'is a directory' if file.is_dir() else 'no such file'}")
        loaded = load_yaml(file, max_bytes=CONFIG_MAX_BYTES)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"{path}: not valid YAML: {problem}{line}") from None
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    except ValueError as error:  # RefusedFile: too long a path, not a file, too large, not UTF-8, anchors, depth
        raise UsageError(str(error) if str(error).startswith("--config") else f"--config {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of settings (key: value), got a {type(loaded).__name__}")
    settings = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(options)}"
            raise UsageError(f"{path}: unknown key {quoted(key)}{hint}")
        settings[name] = convert(options[name], value, f"{path}: {quoted(key)}", yaml=True)
    return settings


def resolve(argv: list[str]) -> dict:
    """Command line + config file -> {name: value} for the options given anywhere (flags win)."""
    options = _options()
    by_name = {option.name: option for option in options}
    args = vars(build_parser(options).parse_args(argv))
    settings = read_config(args.pop("config"), by_name) if "config" in args else {}
    for name, value in args.items():
        option = by_name[name]
        if option.kind not in ("bool", "switch"):
            value = convert(option, value, option.flag, yaml=False)
        settings[name] = value
    return settings


# --- data ------------------------------------------------------------------------------------------


def open_data(settings: dict, batch_size: int, seed: int):
    """(source, rows, d_in, d_out or None, description) for --data (and --targets)."""
    import torch

    from sparsekit.activations import ShardSource, TensorSource, load_activation_file
    from sparsekit.activations.npy import read_npy

    data, targets = Path(settings["data"]), settings.get("targets")
    if data.is_dir():
        if targets is not None:
            raise UsageError("--targets applies only when --data is a .npy file; a shard folder holds its own "
                             "targets (y-*.npy, 'd_out' in manifest.json)")
        source = ShardSource(data, batch_size=batch_size, shuffle=True, seed=seed)  # 16-bit batches: the trainer widens them
        kind = f"{len(source.shards)} shard{'s' if len(source.shards) != 1 else ''} in {data}"
        return source, source.tokens, source.d, source.d_out, kind
    loaded = load_activation_file(data)
    x, y = loaded if isinstance(loaded, tuple) else (loaded, None)
    if targets is not None:
        if data.suffix != ".npy":
            raise UsageError(f"--targets applies only when --data is a .npy file; {data} holds its own targets as 'y'"
                             if y is not None else f"--targets applies only when --data is a .npy file, not {data}")
        target_path = Path(targets)
        if target_path.suffix != ".npy":
            raise UsageError(f"--targets must be a .npy file, got {targets}")
        if not target_path.is_file():
            raise UsageError(f"--targets {targets}: no such file")
        try:
            array = read_npy(target_path, "--targets")  # its header checked against the file before allocating
        except (ValueError, OSError) as error:
            raise UsageError(str(error)) from None
        if array.ndim != 2 or array.dtype.kind != "f" or array.shape[0] == 0:
            raise UsageError(f"--targets {targets} must be a non-empty 2-D floating-point array [N, d_out], got "
                             f"shape {array.shape} {array.dtype}")
        if array.shape[0] != x.shape[0]:
            raise UsageError(f"--targets {targets} has {array.shape[0]} rows but --data {data} has {x.shape[0]}; "
                             f"targets pair with inputs row by row")
        y = torch.from_numpy(array)
    x = x.to(torch.float32)
    y = None if y is None else y.to(torch.float32)
    source = TensorSource(x, y, batch_size=batch_size, shuffle=True, seed=seed)
    return source, x.shape[0], x.shape[1], None if y is None else y.shape[1], str(data)


# --- the run -----------------------------------------------------------------------------------------


LM_ONLY = ("dataset", "hook", "input_hook", "text_field", "document_per_line", "context_len", "eval_contexts", "cache",
           "cache_dtype", "exclude_special_tokens")


def _check_inputs(settings: dict) -> bool:
    """--data, or --model with --dataset, and the flags each allows; True for the language-model path."""
    given = [name for name in ("model", *LM_ONLY) if name in settings]
    if "data" in settings and given:
        flags = "/".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"--data and {flags} exclude each other: --data trains on stored activations, --model with "
                         f"--dataset computes them from text")
    if "data" in settings:
        if not Path(settings["data"]).exists():
            raise UsageError(f"--data {settings['data']}: no such file or directory")
        return False
    if not given:
        raise UsageError("no activations given: pass --data PATH (a shard folder, .npy or .safetensors file), or "
                         "--model with --dataset and --hook, or set 'data:' in the --config file")
    for name in ("model", "dataset", "hook"):
        if name not in settings:
            raise UsageError(f"--{name} is required with --{'dataset' if name == 'model' else 'model'}: "
                             + {"model": "the language model to run (smollm2-135m or a Hugging Face model folder)",
                                "dataset": "the text to run it on (.txt, .jsonl, .parquet files or folders)",
                                "hook": "the activation to train on"}[name])
    if "targets" in settings:
        raise UsageError("--targets applies with --data; with --model a transcoder reads --input-hook and predicts "
                         "--hook")
    return True


def run(argv: list[str]):
    """Parse, check, train, save. Returns (TrainResult, out folder); UsageError on bad input."""
    settings = resolve(argv)
    if _check_inputs(settings):
        from . import train_lm
        return train_lm.run(settings)
    cfg, out, resume, newest, device = prepare(settings)
    try:
        source, rows, d_in, d_out, description = open_data(settings, cfg.batch_size, cfg.seed)
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from None
    if settings.get("transcoder") and d_out is None:
        raise UsageError(f"--transcoder needs targets: --data {settings['data']} has none (pass --targets Y.npy, a "
                         f".safetensors file with 'y', or shards written with (x, y) batches)")
    if settings.get("skip") and d_out is None:
        raise UsageError(f"--skip adds a path from a transcoder's input to its targets: --data {settings['data']} has "
                         f"no targets (pass --targets Y.npy, a .safetensors file with 'y', or (x, y) shards)")
    if newest is None and cfg.eval_tokens >= rows:
        raise UsageError(f"--eval-tokens {cfg.eval_tokens} would hold out all {rows} rows of --data; lower it "
                         f"(e.g. --eval-tokens {rows // 10}) or pass --eval-tokens 0")

    sae = make_dictionary(settings, cfg, d_in, d_out, device, newest, resume)

    kind = ("skip transcoder" if settings.get("skip") else "transcoder") if d_out is not None else "SAE"
    shape = f"d_in={d_in}" + (f" d_out={d_out}" if d_out is not None else "")
    hyper = " ".join(f"{name}={settings[name]}" for name in hyperparameter_flags() if name in settings)
    say(f"{PROG}: {settings['architecture']} {kind} {shape} n_latents={sae.n_latents} {hyper} on {rows:,} rows "
        f"from {description}; {cfg.total_tokens // cfg.batch_size:,} steps of {cfg.batch_size} on {device}")
    return train_and_save(sae, source, cfg, resume, out)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except UsageError as error:
        print(failure_line(error), file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingError as error:
        print(failure_line(error), file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted; continue with the same command and --resume (checkpoints need "
            f"--checkpoint-dir)", sys.stderr)  # every rank got the signal: rank 0 says it once
        raise SystemExit(130) from None
