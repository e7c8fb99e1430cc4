"""Bad input at every public entry gives one clear error naming the field and what was expected:
SAE constructors and forward passes, TrainConfig, train's sources, every flag of `sparsekit train`.
(The ops' table is tests/ops/test_bad_input.py, sparsekit.load's tests/sae/test_sae_persistence.py, the
CLI's scenario table tests/cli/test_cli_train.py; the table in docs/reliability.md collects them all.)

    python tests/package/test_bad_input_everywhere.py     # prints that Markdown table, every case
"""
from __future__ import annotations

import io
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsekit
from sparsekit import TrainConfig, train

D, N = 8, 16


def topk(**kw):
    return sparsekit.TopKSAE(D, N, k=2, **kw)


def quick(**overrides):
    return TrainConfig(**{**dict(batch_size=32, total_tokens=32 * 4, eval_tokens=0, progress=False), **overrides})


def run_train(source, sae=None, **overrides):
    return train(sae if sae is not None else topk(), source, quick(**overrides))


def rows(count=32, width=D):
    return torch.randn(count, width)


def poisoned(value, at=3):
    batches = [rows() for _ in range(6)]
    batches[at][5, 2] = value
    return batches


def exhausted_generator():
    generator = (rows() for _ in range(3))
    list(generator)
    return generator


# (entry, case, call, exception type, fragment the message must hold)
CASES = [
    ("SAE constructor", "k = 0", lambda: sparsekit.TopKSAE(D, N, k=0), ValueError, "k must be a positive int, got 0"),
    ("SAE constructor", "k > n_latents", lambda: sparsekit.BatchTopKSAE(D, N, k=17), ValueError,
     "k=17 exceeds n_latents=16"),
    ("SAE constructor", "k a string", lambda: sparsekit.TopKSAE(D, N, k="3"), ValueError,
     "k must be a positive int, got '3'"),
    ("SAE constructor", "d_in negative", lambda: sparsekit.TopKSAE(-1, N, k=2), ValueError,
     "d_in must be a positive int, got -1"),
    ("SAE constructor", "d_in a float", lambda: sparsekit.TopKSAE(8.0, N, k=2), ValueError,
     "d_in must be a positive int, got 8.0"),
    ("SAE constructor", "n_latents zero", lambda: sparsekit.ReLUSAE(D, 0, l1_coeff=1e-3), ValueError,
     "n_latents must be a positive int, got 0"),
    ("SAE constructor", "l1_coeff negative", lambda: sparsekit.ReLUSAE(D, N, l1_coeff=-1), ValueError,
     "l1_coeff must be a positive finite number, got -1"),
    ("SAE constructor", "l1_coeff NaN", lambda: sparsekit.ReLUSAE(D, N, l1_coeff=float("nan")), ValueError,
     "l1_coeff must be a positive finite number, got nan"),
    ("SAE constructor", "l0_coeff a string", lambda: sparsekit.JumpReLUSAE(D, N, l0_coeff="1"), ValueError,
     "l0_coeff must be a positive finite number, got '1'"),
    ("SAE constructor", "bandwidth zero", lambda: sparsekit.JumpReLUSAE(D, N, l0_coeff=1e-3, bandwidth=0), ValueError,
     "bandwidth must be a positive finite number, got 0"),
    ("SAE constructor", "SAE with d_out != d_in", lambda: sparsekit.TopKSAE(D, N, k=2, d_out=4), ValueError,
     "d_out=4 differs from d_in=8: use sparsekit.Transcoder"),
    ("SAE constructor", "transcoder architecture", lambda: sparsekit.Transcoder(D, N, 4, k=2, architecture="sparse"),
     ValueError, "architecture must be one of batchtopk, gated, jumprelu, matryoshka_batchtopk, relu, topk, got 'sparse'"),
    ("SAE constructor", "transcoder d_out zero", lambda: sparsekit.Transcoder(D, N, 0, k=2), ValueError,
     "d_out must be a positive int, got 0"),
    ("SAE forward", "input of another width", lambda: topk().encode(rows(4, 9)), ValueError,
     "W_enc has size 8 on axis 0, expected 9 (d_in, the width of x)"),
    ("SAE forward", "1-D input", lambda: topk().encode(torch.randn(D)), ValueError, "x must be 2-D, got shape (8,)"),
    ("SAE forward", "float64 input to a float32 SAE", lambda: topk().encode(rows(4).double()), ValueError,
     "W_enc has dtype torch.float32, expected torch.float64 like x"),
    ("SAE forward", "NaN input", lambda: topk()(torch.full((4, D), float("nan"))), ValueError, "x contains NaN or Inf"),
    # TrainConfig: every field's type, and the ranges
    ("TrainConfig", "batch_size 0", lambda: run_train(rows(), batch_size=0), ValueError,
     "TrainConfig.batch_size must be a positive int, got 0"),
    ("TrainConfig", "batch_size a float", lambda: run_train(rows(), batch_size=32.0), ValueError,
     "TrainConfig.batch_size must be an int, got 32.0"),
    ("TrainConfig", "lr a string", lambda: run_train(rows(), lr="3e-4"), ValueError,
     "TrainConfig.lr must be a finite number, got '3e-4'"),
    ("TrainConfig", "lr True", lambda: run_train(rows(), lr=True), ValueError,
     "TrainConfig.lr must be a finite number, got True"),
    ("TrainConfig", "lr infinite", lambda: run_train(rows(), lr=float("inf")), ValueError,
     "TrainConfig.lr must be a finite number, got inf"),
    ("TrainConfig", "lr negative", lambda: run_train(rows(), lr=-1.0), ValueError,
     "TrainConfig.lr must be a positive finite number, got -1.0"),
    ("TrainConfig", "total_tokens below one batch", lambda: run_train(rows(), total_tokens=10), ValueError,
     "TrainConfig.total_tokens=10 is less than one batch (batch_size=32)"),
    ("TrainConfig", "lr_decay_fraction a string", lambda: run_train(rows(), lr_decay_fraction="0.2"), ValueError,
     "TrainConfig.lr_decay_fraction must be a finite number, got '0.2'"),
    ("TrainConfig", "lr_decay_fraction 1.5", lambda: run_train(rows(), lr_decay_fraction=1.5), ValueError,
     "TrainConfig.lr_decay_fraction must be in [0, 1], got 1.5"),
    ("TrainConfig", "adam_betas of one number", lambda: run_train(rows(), adam_betas=(0.9,)), ValueError,
     "TrainConfig.adam_betas must be two numbers in [0, 1), got (0.9,)"),
    ("TrainConfig", "adam_betas above 1", lambda: run_train(rows(), adam_betas=(0.9, 1.5)), ValueError,
     "TrainConfig.adam_betas must be two numbers in [0, 1), got (0.9, 1.5)"),
    ("TrainConfig", "adam_eps negative", lambda: run_train(rows(), adam_eps=-1.0), ValueError,
     "TrainConfig.adam_eps must be a positive number, got -1.0"),
    ("TrainConfig", "grad_clip_norm a string", lambda: run_train(rows(), grad_clip_norm="1"), ValueError,
     "TrainConfig.grad_clip_norm must be a finite number or None, got '1'"),
    ("TrainConfig", "grad_clip_norm zero", lambda: run_train(rows(), grad_clip_norm=0.0), ValueError,
     "TrainConfig.grad_clip_norm must be positive or None, got 0.0"),
    ("TrainConfig", "normalize_inputs a string", lambda: run_train(rows(), normalize_inputs="yes"), ValueError,
     "TrainConfig.normalize_inputs must be True or False, got 'yes'"),
    ("TrainConfig", "b_dec_init unknown", lambda: run_train(rows(), b_dec_init="median"), ValueError,
     "TrainConfig.b_dec_init must be geometric_median, mean, zeros or keep, got 'median'"),
    ("TrainConfig", "eval_tokens negative", lambda: run_train(rows(), eval_tokens=-1), ValueError,
     "TrainConfig.eval_tokens must be a non-negative int, got -1"),
    ("TrainConfig", "dead_strategy unknown", lambda: run_train(rows(), dead_strategy="ghosts"), ValueError,
     "dead_strategy 'ghosts': 'ghosts' is not one of none, resample, ghost, auxk"),
    ("TrainConfig", "dead_strategy 'none+auxk'", lambda: run_train(rows(), dead_strategy="none+auxk"), ValueError,
     "dead_strategy 'none+auxk': 'none' cannot be combined"),
    ("TrainConfig", "dead_strategy a number", lambda: run_train(rows(), dead_strategy=5), ValueError,
     "TrainConfig.dead_strategy must be a string, got 5"),
    ("TrainConfig", "aux_k zero", lambda: run_train(rows(), aux_k=0), ValueError,
     "TrainConfig.aux_k must be a positive int, got 0"),
    ("TrainConfig", "aux_coeff negative", lambda: run_train(rows(), aux_coeff=-1.0), ValueError,
     "TrainConfig.aux_coeff must be a non-negative number, got -1.0"),
    ("TrainConfig", "resample_at_tokens not counts", lambda: run_train(rows(), resample_at_tokens=(1, "a")),
     ValueError, "TrainConfig.resample_at_tokens must be token counts (non-negative ints), got (1, 'a')"),
    ("TrainConfig", "seed a string", lambda: run_train(rows(), seed="0"), ValueError,
     "TrainConfig.seed must be an int, got '0'"),
    ("TrainConfig", "log_every zero", lambda: run_train(rows(), log_every=0), ValueError,
     "TrainConfig.log_every must be a positive int, got 0"),
    ("TrainConfig", "checkpoint_dir a number", lambda: run_train(rows(), checkpoint_dir=5), ValueError,
     "TrainConfig.checkpoint_dir must be a string or None, got 5"),
    ("TrainConfig", "checkpoint_every_tokens without a folder", lambda: run_train(rows(), checkpoint_every_tokens=64),
     ValueError, "TrainConfig.checkpoint_every_tokens needs a checkpoint_dir"),
    ("TrainConfig", "progress a string", lambda: run_train(rows(), progress="no"), ValueError,
     "TrainConfig.progress must be True or False, got 'no'"),
    ("train()", "config not a TrainConfig", lambda: train(topk(), rows(), {"lr": 1}), ValueError,
     "config must be a TrainConfig, got dict"),
    ("train()", "not a sparsekit dictionary", lambda: train(torch.nn.Linear(2, 2), rows(), quick()), ValueError,
     "sae must be a sparsekit dictionary, got Linear"),
    ("train()", "auxk for a ReLU SAE", lambda: run_train(rows(), sae=sparsekit.ReLUSAE(D, N, 1e-3), dead_strategy="auxk"),
     ValueError, "dead_strategy 'auxk' needs a topk, batchtopk or matryoshka_batchtopk dictionary, not 'relu'"),
    ("train()", "resume without a folder", lambda: train(topk(), rows(), quick(), resume=True), ValueError,
     "resume=True needs TrainConfig.checkpoint_dir"),
    # sources
    ("train source", "rows of the wrong width", lambda: run_train([rows(32, 9)] * 6), ValueError,
     "source batch 1: x must be a float tensor [rows, d_in=8], got (32, 9)"),
    ("train source", "NaN batch mid-stream", lambda: run_train(poisoned(float("nan"))), ValueError,
     "source batch 4: x row 5 contains NaN or Inf"),
    ("train source", "Inf batch mid-stream", lambda: run_train(poisoned(float("inf"), at=2)), ValueError,
     "source batch 3: x row 5 contains NaN or Inf"),
    ("train source", "empty list", lambda: run_train([]), ValueError,
     "the source yielded no batches: it is empty, or an iterator or generator that was already consumed"),
    ("train source", "exhausted generator", lambda: run_train(exhausted_generator()), ValueError,
     "the source yielded no batches"),
    ("train source", "runs out mid-run", lambda: run_train([rows()] * 2), ValueError,
     "the source ran out after 64 training tokens; TrainConfig.total_tokens=128: lower total_tokens or let the "
     "source repeat"),
    ("train source", "runs out before the held-out split", lambda: run_train([rows()] * 2, eval_tokens=100), ValueError,
     "the source ran out after 2 batches, before the held-out split (TrainConfig.eval_tokens)"),
    ("train source", "tensor with no rows", lambda: run_train(torch.randn(0, D)), ValueError,
     "x has 0 rows; an activation source needs at least one"),
    ("train source", "1-D tensor", lambda: run_train(torch.randn(512)), ValueError,
     "x must be 2-D [rows, features], got shape (512,)"),
    ("train source", "integer tensor", lambda: run_train(torch.randint(0, 3, (512, D))), ValueError,
     "x must be a floating-point tensor, got torch.int64"),
    ("train source", "a path string", lambda: run_train("acts.npy"), ValueError,
     "cannot read activations from a str: pass a Tensor"),
    ("train source", "None", lambda: run_train(None), ValueError, "cannot read activations from a NoneType"),
    ("train source", "list of strings", lambda: run_train(["a", "b"]), ValueError,
     "source batch 1: x must be a float tensor [rows, d_in=8], got str"),
    ("train source", "transcoder without targets", lambda: run_train(rows(256), sae=sparsekit.Transcoder(D, N, 4, k=2)),
     ValueError, "source batch 1: a transcoder needs (x, y) batches"),
    ("train source", "targets of the wrong width",
     lambda: run_train((rows(256), rows(256, 5)), sae=sparsekit.Transcoder(D, N, 4, k=2)), ValueError,
     "source batch 1: y must be [rows=32, d_out=4], got (32, 5)"),
    ("train source", "targets with other rows",
     lambda: run_train((rows(256), rows(250, 4)), sae=sparsekit.Transcoder(D, N, 4, k=2)), ValueError,
     "y has 250 rows but x has 256; targets pair with inputs row by row"),
    ("sparsekit.load", "path None", lambda: sparsekit.load(None), ValueError,
     "directory must be a path (str or os.PathLike), got None"),
    ("sparsekit.load", "path a number", lambda: sparsekit.load(5), ValueError,
     "directory must be a path (str or os.PathLike), got 5"),
    ("sparsekit.load", "a file, not a folder", lambda: sparsekit.load(__file__), FileNotFoundError,
     "is not a directory: expected one written by sae.save()"),
]


@pytest.mark.parametrize("entry, name, call, error, fragment", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_clear_error_naming_the_field(entry, name, call, error, fragment):
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    assert fragment in message and "\n" not in message, message


# --- every flag of `sparsekit train` ------------------------------------------------------------------

# flag -> (bad value, fragment of the one-line error). Values are substituted: {root} is a folder
# holding x.npy [3000, 16] and notes.txt.
FLAG_CASES = {
    "--data": ("{root}/nope.npy", "--data {root}/nope.npy: no such file or directory"),
    "--targets": ("{root}/notes.txt", "--targets must be a .npy file, got {root}/notes.txt"),
    "--architecture": ("sparse", "unknown architecture 'sparse'; choose one of topk, batchtopk, relu, jumprelu, gated"),
    "--n-latents": ("-4", "--n-latents must be a positive int, got -4"),
    "--k": ("2.5", "--k must be an int, got '2.5'"),
    "--matryoshka-widths": ("8,x", "--matryoshka-widths must be comma-separated ints, got '8,x'"),
    "--l1-coeff": ("lots", "--l1-coeff must be a number, got 'lots'"),
    "--l0-coeff": ("nan", "--l0-coeff must be a number, got 'nan'"),
    "--bandwidth": ("inf", "--bandwidth must be a number, got 'inf'"),
    "--init-threshold": ("x", "--init-threshold must be a number, got 'x'"),
    "--transcoder": (None, "--transcoder needs targets"),
    "--skip": (None, "--skip adds a path from a transcoder's input to its targets"),
    "--device": ("toaster", "--device 'toaster' is not a device; use auto, cpu, cuda or cuda:N"),
    "--out": ("{root}/notes.txt", "--out {root}/notes.txt is a file, not a folder"),
    "--resume": (None, "--resume needs --checkpoint-dir"),
    "--batch-size": ("0", "TrainConfig.batch_size must be a positive int, got 0"),
    "--lr": ("-1", "TrainConfig.lr must be a positive finite number, got -1.0"),
    "--total-tokens": ("1e2", "TrainConfig.total_tokens=100 is less than one batch (batch_size=4096)"),
    "--lr-warmup-tokens": ("-5", "TrainConfig.lr_warmup_tokens must be a non-negative int, got -5"),
    "--lr-decay-fraction": ("2", "TrainConfig.lr_decay_fraction must be in [0, 1], got 2.0"),
    "--l1-warmup-tokens": ("soon", "--l1-warmup-tokens must be an int, got 'soon'"),
    "--adam-betas": ("0.9,1.2", "TrainConfig.adam_betas must be two numbers in [0, 1), got (0.9, 1.2)"),
    "--adam-eps": ("0", "TrainConfig.adam_eps must be a positive number, got 0.0"),
    "--grad-clip-norm": ("-1", "TrainConfig.grad_clip_norm must be positive or None, got -1.0"),
    "--normalize-inputs": ("=yes", "argument --normalize-inputs/--no-normalize-inputs: ignored explicit argument 'yes'"),
    "--b-dec-init": ("median", "TrainConfig.b_dec_init must be geometric_median, mean, zeros or keep, got 'median'"),
    "--eval-tokens": ("5000", "--eval-tokens 5000 would hold out all 3000 rows of --data"),
    "--dead-window-tokens": ("0", "TrainConfig.dead_window_tokens must be a positive int, got 0"),
    "--dead-strategy": ("magic", "'magic' is not one of none, resample, ghost, auxk"),
    "--aux-k": ("0", "TrainConfig.aux_k must be a positive int, got 0"),
    "--aux-coeff": ("-1", "TrainConfig.aux_coeff must be a non-negative number, got -1.0"),
    "--resample-at-tokens": ("10,x", "--resample-at-tokens must be comma-separated ints or none, got '10,x'"),
    "--seed": ("1.5", "--seed must be an int, got '1.5'"),
    "--log-every": ("0", "TrainConfig.log_every must be a positive int, got 0"),
    "--output-dir": ("{root}/notes.txt", "--output-dir {root}/notes.txt is a file, not a folder"),
    "--checkpoint-dir": ("{root}/notes.txt", "--checkpoint-dir {root}/notes.txt is a file, not a folder"),
    "--checkpoint-every-tokens": ("0", "TrainConfig.checkpoint_every_tokens must be a positive int, got 0"),
    "--progress": ("=1", "argument --progress/--no-progress: ignored explicit argument '1'"),
    "--config": ("{root}/none.yaml", "--config {root}/none.yaml: no such file"),
    "--latent-parallel": ("0", "--latent-parallel must be a positive int, got 0"),
    # --model/--dataset and their flags exclude --data (tests/cli/test_cli_train.py's table has their own cases)
    "--model": ("smollm2-135m", "--data and --model exclude each other"),
    "--dataset": ("{root}/notes.txt", "--data and --dataset exclude each other"),
    "--hook": ("blocks.0.hook_resid_post", "--data and --hook exclude each other"),
    "--input-hook": ("blocks.0.ln2.hook_normalized", "--data and --input-hook exclude each other"),
    "--text-field": ("body", "--data and --text-field exclude each other"),
    "--document-per-line": (None, "--data and --document-per-line exclude each other"),
    "--context-len": ("64", "--data and --context-len exclude each other"),
    "--eval-contexts": ("8", "--data and --eval-contexts exclude each other"),
    "--cache": ("{root}/cache", "--data and --cache exclude each other"),
    "--cache-dtype": ("bfloat16", "--data and --cache-dtype exclude each other"),
    "--exclude-special-tokens": ("=yes", "argument --exclude-special-tokens/--no-exclude-special-tokens: ignored "
                                         "explicit argument 'yes'"),
}
# Flags whose every value is valid (free-form names) have no bad value to try.
FREE_FORM_FLAGS = {"--wandb-project", "--wandb-run-name"}


def make_cli_data(root: Path) -> Path:
    gen = np.random.default_rng(0)
    np.save(root / "x.npy", gen.standard_normal((3000, 16)).astype(np.float32))
    (root / "notes.txt").write_text("not activations")
    return root


def cli_arguments(flag: str, value, root: Path) -> list[str]:
    base = ["--data", str(root / "x.npy"), "--n-latents", "8", "--k", "2", "--out", str(root / "out"),
            "--no-progress"]
    if flag == "--data":
        base = base[2:]
    if flag in ("--l1-coeff", "--l0-coeff", "--bandwidth", "--init-threshold"):  # their architectures
        base = [a for a in base if a not in ("--k", "2")] + ["--architecture", "jumprelu" if flag != "--l1-coeff"
                                                             else "relu"]
        if flag in ("--bandwidth", "--init-threshold", "--l1-coeff"):
            base += ["--l0-coeff", "1e-3"] if flag != "--l1-coeff" else []
    if flag == "--aux-coeff" or flag == "--aux-k":
        base += ["--dead-strategy", "auxk"]
    if value is None:
        return base + [flag]
    value = value.format(root=root)
    return base + ([flag + value] if value.startswith("=") else [flag, value])


def run_cli(arguments: list[str]) -> tuple[int, str]:
    from sparsekit.cli.train import main

    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            main(arguments)
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    return make_cli_data(tmp_path_factory.mktemp("cli"))


def test_every_flag_has_a_bad_value_case():
    from sparsekit.cli.train import build_parser

    flags = {s for action in build_parser()._actions for s in action.option_strings
             if s.startswith("--") and not s.startswith("--no-") and s != "--help"}
    assert flags - FREE_FORM_FLAGS == set(FLAG_CASES), flags ^ set(FLAG_CASES)


@pytest.mark.parametrize("flag", list(FLAG_CASES))
def test_every_flag_refuses_a_bad_value_with_one_line(flag, cli_root):
    value, fragment = FLAG_CASES[flag]
    code, err = run_cli(cli_arguments(flag, value, cli_root))
    assert code == 2 and err.startswith("sparsekit train: ") and err.count("\n") == 1, err
    assert fragment.format(root=cli_root) in err, err


# --- the table in docs/reliability.md ---------------------------------------------------------------

TESTS = Path(__file__).resolve().parents[1]
DOC = TESTS.parent / "docs" / "reliability.md"


def suite_tables():
    """The other folders' case tables (pytest puts a folder on sys.path only when it collects it;
    tests/ itself, for the helpers package, only under pytest)."""
    for folder in (TESTS, TESTS / "ops", TESTS / "sae", TESTS / "cli"):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    import test_bad_input
    import test_cli_train
    import test_sae_persistence

    return test_bad_input, test_cli_train, test_sae_persistence


def _message(call) -> tuple[str, str]:
    try:
        call()
    except Exception as error:  # the table shows what each case raised
        return type(error).__name__, str(error)
    return "no error", ""


def table_rows() -> list[tuple[str, str, str, str]]:
    """(entry, case, exception, message) for every bad-input case in the test suite."""
    test_bad_input, test_cli_train, test_sae_persistence = suite_tables()

    rows_out = [(entry, name, *_message(call)) for entry, name, call, _, _ in CASES]
    rows_out += [("ops (torch and cpp)", name, *_message(call)) for name, (call, _) in test_bad_input.CASES.items()]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (edit, _, _, _) in test_sae_persistence.BAD_FILES.items():
            folder = Path(tmp) / name.replace(" ", "_")
            test_sae_persistence.make_dictionary("topk").save(folder)
            edit(folder)
            kind, message = _message(lambda: sparsekit.load(folder))
            rows_out.append(("sparsekit.load", name, kind, message.replace(str(folder), "DIR")))
        root = make_cli_data(Path(tmp))
        for flag, (value, _) in FLAG_CASES.items():
            code, err = run_cli(cli_arguments(flag, value, root))
            shown = flag if value is None else f"{flag} {value.lstrip('=')}".format(root="DIR")
            rows_out.append(("sparsekit train flag", shown, f"exit {code}", err.strip().replace(str(root), "DIR")))
        files = test_cli_train.make_files(Path(tmp) / "cli")
        for case_id, args, config, _ in test_cli_train.BAD_INPUTS:
            names = {"x": files / "x.npy", "root": files, "tmp": Path(tmp)}
            if config is not None:
                (Path(tmp) / "cfg.yaml").write_text(config.format(**names))
            code, err = run_cli([a.format(**names) for a in args] + ["--no-progress"])
            message = err.strip().replace(str(files), "DIR").replace(str(tmp), "TMP")
            rows_out.append(("sparsekit train", case_id, f"exit {code}", message))
    return rows_out


def markdown_table() -> str:
    rows_out = table_rows()
    counts = {}
    for entry, *_ in rows_out:
        counts[entry] = counts.get(entry, 0) + 1
    lines = [f"{len(rows_out)} bad inputs tried: " + ", ".join(f"{entry} {n}" for entry, n in counts.items()) + ".", "",
             "| entry | bad input | raises | message |", "| --- | --- | --- | --- |"]
    escape = lambda text: text.replace("|", "\\|").replace("\n", " ")
    lines += [f"| {entry} | {escape(name)} | {kind} | {escape(message)} |" for entry, name, kind, message in rows_out]
    return "\n".join(lines)


def test_the_reliability_doc_table_lists_every_case():
    test_bad_input, test_cli_train, test_sae_persistence = suite_tables()
    doc = DOC.read_text()
    total = (len(CASES) + len(test_bad_input.CASES) + len(test_sae_persistence.BAD_FILES) + len(FLAG_CASES)
             + len(test_cli_train.BAD_INPUTS))
    regenerate = ("regenerate it: python tests/package/test_bad_input_everywhere.py, and paste what it prints "
                  "into docs/reliability.md (section 'Bad input', inside <details>)")
    assert f"{total} bad inputs tried: " in doc, regenerate
    table = doc.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    assert table.count("\n| ") - table.count("\n| ---") >= total, regenerate


if __name__ == "__main__":
    print(markdown_table())
