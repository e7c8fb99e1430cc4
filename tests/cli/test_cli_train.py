"""`python -m sparsekit train`: trains from .npy, .safetensors and shard folders, reads YAML configs
(flags win), resumes from checkpoints, and refuses bad input with one clear line and status 2."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_lm import make_tiny_lm

import sparsekit
from sparsekit import TrainConfig
from sparsekit.activations import write_shards
from sparsekit.cli.train import build_parser, main

D, ROWS = 16, 3000
QUICK = ["--batch-size", "128", "--total-tokens", "1280", "--eval-tokens", "256", "--log-every", "5",
         "--lr", "3e-3", "--no-progress", "--device", "cpu"]


def sparse_rows(rows=ROWS, d=D, seed=0) -> np.ndarray:
    """Sums of a few of 40 unit directions: data a small dictionary can learn."""
    gen = np.random.default_rng(seed)
    directions = gen.standard_normal((40, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = (gen.random((rows, 40)) < 0.05) * gen.random((rows, 40))
    return (codes @ directions).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("activations"))


def make_files(root):
    """The activation files the CLI tests read, written into root."""
    root.mkdir(parents=True, exist_ok=True)
    x = sparse_rows()
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", x[:, :8] * 2)
    np.save(root / "y_short.npy", x[:100, :8])
    np.save(root / "x8.npy", x[:, :8])
    save_file({"x": torch.from_numpy(x), "y": torch.from_numpy(x[:, :8] * 2 + 1)}, str(root / "xy.safetensors"))
    write_shards(root / "shards", (torch.from_numpy(x[i:i + 250]) for i in range(0, ROWS, 250)), dtype="float16",
                 shard_rows=1000)
    (root / "empty_dir").mkdir()
    (root / "notes.txt").write_text("not activations")
    fake = root / "used_ckpt" / "step_000000001"  # a folder holding an earlier run's checkpoint
    fake.mkdir(parents=True)
    (fake / "state.json").write_text("{}")
    # --model/--dataset: a tiny random Llama folder and text (tests/cli/test_cli_train_lm.py trains on them)
    words = "the cat sat on a mat and then the dog ran to the park".split()
    make_tiny_lm(root / "lm", " ".join(words))
    (root / "docs.jsonl").write_text("".join(json.dumps({"body": " ".join(words[i:] + words[:i])}) + "\n"
                                             for i in range(len(words))))
    (root / "empty.txt").write_text("")
    return root


def call(*args):
    """main(args) in-process -> exit code (0 when it returns)."""
    try:
        main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code
    return 0


def summary_line(out: str) -> str:
    lines = [line for line in out.splitlines() if "dictionary saved to" in line]
    assert len(lines) == 1, out
    return lines[0]


def test_every_train_config_field_has_a_flag():
    flags = {s for action in build_parser()._actions for s in action.option_strings}
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in flags, field.name
    for flag in ("--data", "--targets", "--architecture", "--n-latents", "--k", "--l1-coeff", "--l0-coeff",
                 "--bandwidth", "--transcoder", "--config", "--resume", "--out", "--no-progress"):
        assert flag in flags, flag


def test_trains_a_topk_sae_from_a_npy_file(files, tmp_path, capsys):
    out = tmp_path / "sae"
    assert call("--data", files / "x.npy", "--n-latents", 64, "--k", 4, "--out", out,
                "--dead-strategy", "auxk", "--adam-betas", "0.9,0.99", *QUICK) == 0
    line = summary_line(capsys.readouterr().out)
    assert f"dictionary saved to {out}" in line and f"metrics in {out / 'metrics.jsonl'}" in line
    assert all(word in line for word in ("fvu", "l0 4.00", "dead_frac", "10 steps"))
    sae = sparsekit.load(out)
    assert (sae.architecture, sae.d_in, sae.n_latents, sae.k, sae.transcoder) == ("topk", D, 64, 4, False)
    fvus = [json.loads(l)["fvu"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(fvus) == 2 and fvus[-1] < fvus[0]


def test_trains_a_relu_sae_from_a_shard_folder(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert call("--data", files / "shards", "--architecture", "relu", "--n-latents", 32, "--l1-coeff", "0.01",
                "--output-dir", run, "--grad-clip-norm", "none", *QUICK) == 0
    line = summary_line(capsys.readouterr().out)
    assert f"dictionary saved to {run / 'final'}" in line  # default --out: <output_dir>/final
    assert (run / "metrics.jsonl").is_file() and (run / "feature_density.png").is_file()
    sae = sparsekit.load(run / "final")
    assert (sae.architecture, sae.d_in, sae.n_latents, sae.l1_coeff) == ("relu", D, 32, 0.01)


def test_yaml_config_with_a_flag_override(files, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {files / 'x.npy'}\narchitecture: batchtopk\nn_latents: 32\nk: 4\n"
                      f"lr: 1e-3\nlr_decay_fraction: 0\nbatch_size: 128\ntotal_tokens: 1280\neval_tokens: 256\n"
                      f"log_every: 5\ndead_strategy: auxk\nadam_betas: [0.9, 0.99]\nprogress: false\n"
                      f"device: cpu\nout: {tmp_path / 'from_yaml'}\n")
    assert call("--config", config, "--lr", "2e-3", "--k", 2) == 0
    summary_line(capsys.readouterr().out)
    sae = sparsekit.load(tmp_path / "from_yaml")
    assert (sae.architecture, sae.n_latents, sae.k) == ("batchtopk", 32, 2)  # n_latents from the file, k from the flag
    lrs = {json.loads(l)["lr"] for l in (tmp_path / "from_yaml" / "metrics.jsonl").read_text().splitlines()}
    assert lrs == {2e-3}


def test_resume_continues_from_the_final_checkpoint(files, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = ["--data", files / "x.npy", "--n-latents", 32, "--k", 3, "--checkpoint-dir", ckpt, *QUICK]
    assert call(*args) == 0
    assert f"dictionary saved to {ckpt / 'final'}" in summary_line(capsys.readouterr().out)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000000009", "step_000000010"]  # every 10% by default

    assert call(*args, "--resume", "--out", tmp_path / "resumed") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert f"sparsekit: resumed from {ckpt / 'step_000000010'} (step 10," in captured.err
    assert "after 10 steps" in summary_line(out)
    first, again = load_file(str(ckpt / "final" / "sae.safetensors")), load_file(str(tmp_path / "resumed" / "sae.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    assert (ckpt / "final" / "cfg.json").read_text() == (tmp_path / "resumed" / "cfg.json").read_text()

    # A checkpoint refuses data of another width, and a fresh run refuses a folder with checkpoints.
    assert call("--data", files / "x8.npy", *args[2:], "--resume") == 2
    assert "was written by a different run: d_in=16 (this run: 8)" in capsys.readouterr().err
    assert call(*args) == 2
    assert "already holds checkpoints (newest step_000000010)" in capsys.readouterr().err


@pytest.mark.parametrize("data, extra, d_out", [("xy.safetensors", [], 8), ("x.npy", ["--targets", "y.npy"], 8)])
def test_trains_a_transcoder_when_targets_exist(files, tmp_path, capsys, data, extra, d_out):
    extra = [files / e if e.endswith(".npy") else e for e in extra]
    assert call("--data", files / data, *extra, "--n-latents", 32, "--k", 4, "--out", tmp_path / "tc",
                "--transcoder", *QUICK) == 0
    assert "topk transcoder d_in=16 d_out=8" in capsys.readouterr().out
    sae = sparsekit.load(tmp_path / "tc")
    assert sae.transcoder and (sae.d_in, sae.d_out) == (D, d_out)


def test_trains_a_skip_transcoder_and_refuses_skip_without_targets(files, tmp_path, capsys):
    assert call("--data", files / "x.npy", "--targets", files / "y.npy", "--n-latents", 32, "--k", 4,
                "--out", tmp_path / "tc", "--skip", *QUICK) == 0
    assert "topk skip transcoder d_in=16 d_out=8" in capsys.readouterr().out
    sae = sparsekit.load(tmp_path / "tc")
    assert sae.skip and tuple(sae.W_skip.shape) == (D, 8) and torch.count_nonzero(sae.W_skip) > 0
    assert call("--data", files / "x.npy", "--n-latents", 32, "--k", 4, "--skip", "--out", tmp_path / "no", *QUICK) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsekit train: --skip adds a path from a transcoder's input") and err.count("\n") == 1


def test_end_to_end_as_a_subprocess(files, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {files / 'shards'}\nn_latents: 32\nk: 4\ntotal_tokens: 1e4\n")
    result = subprocess.run([sys.executable, "-m", "sparsekit", "train", "--config", str(config), "--batch-size", "250",
                             "--eval-tokens", "500", "--checkpoint-dir", str(tmp_path / "run"), "--no-progress",
                             "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = summary_line(result.stdout)
    assert f"dictionary saved to {tmp_path / 'run' / 'final'}" in line and "after 40 steps (10,000 tokens)" in line
    assert sparsekit.load(tmp_path / "run" / "final").n_latents == 32


BASE = ["--data", "{x}", "--n-latents", "8", "--k", "2", "--out", "{tmp}/out"]
LM = ["--model", "{root}/lm", "--dataset", "{root}/docs.jsonl", "--hook", "model.layers.0", "--text-field", "body",
      "--context-len", "16", "--eval-contexts", "4",
      "--n-latents", "8", "--k", "2", "--out", "{tmp}/out", "--device", "cpu"]
BAD_INPUTS = [
    # (id, arguments, YAML written to {tmp}/cfg.yaml or None, expected text on stderr)
    ("no data", ["--n-latents", "8", "--k", "2", "--out", "{tmp}/o"], None, "no activations given: pass --data PATH"),
    ("data missing", ["--data", "{root}/nope.npy", "--n-latents", "8", "--k", "2", "--out", "{tmp}/o"], None,
     "--data {root}/nope.npy: no such file or directory"),
    ("unknown architecture", BASE + ["--architecture", "topkk"], None,
     "unknown architecture 'topkk' (did you mean topk?); choose one of topk, batchtopk, relu, jumprelu, gated"),
    ("no n_latents", ["--data", "{x}", "--k", "2", "--out", "{tmp}/o"], None, "--n-latents is required"),
    ("k missing", ["--data", "{x}", "--n-latents", "8", "--out", "{tmp}/o"], None,
     "--k is required for a topk dictionary"),
    ("k > n_latents", ["--data", "{x}", "--n-latents", "8", "--k", "9", "--out", "{tmp}/o"], None,
     "--k 9 exceeds --n-latents 8"),
    ("l1 missing", BASE[:4] + ["--architecture", "relu", "--out", "{tmp}/o"], None,
     "--l1-coeff is required for a relu dictionary"),
    ("l1 for topk", BASE + ["--l1-coeff", "0.1"], None, "--l1-coeff applies to relu and gated dictionaries, not topk"),
    ("k for jumprelu", BASE + ["--architecture", "jumprelu", "--l0-coeff", "1e-3"], None,
     "--k applies to topk, batchtopk and matryoshka_batchtopk dictionaries, not jumprelu"),
    ("not an int", BASE + ["--batch-size", "big"], None, "--batch-size must be an int, got 'big'"),
    ("not a number", BASE + ["--lr", "fast"], None, "--lr must be a number, got 'fast'"),
    ("seed beyond 64 bits", BASE + ["--seed", "99999999999999999999999"], None,
     "--seed: 99999999999999999999999 does not fit in 64 bits (an int must lie within +-9,223,372,036,854,775,807)"),
    ("total tokens 1e300", BASE + ["--total-tokens", "1e300"], None,
     "--total-tokens: an integer of 301 digits does not fit in 64 bits (an int must lie within +-9,223,372,036,854,775,807)"),
    ("dead window beyond 64 bits", BASE + ["--dead-window-tokens", str(2**64)], None,
     f"--dead-window-tokens: {2**64} does not fit in 64 bits (an int must lie within +-9,223,372,036,854,775,807)"),
    ("n latents beyond 64 bits", BASE + ["--n-latents", str(2**63)], None,
     f"--n-latents: {2**63} does not fit in 64 bits (an int must lie within +-9,223,372,036,854,775,807)"),
    ("matryoshka widths beyond 64 bits", BASE + ["--architecture", "matryoshka_batchtopk",
                                                             "--matryoshka-widths", f"4,{2**70}"], None,
     f"--matryoshka-widths: {2**70} does not fit in 64 bits (an int must lie within +-9,223,372,036,854,775,807)"),
    ("device meta", BASE + ["--device", "meta"], None, "--device 'meta' is not a device; use auto, cpu, cuda or cuda:N"),
    ("device mps", BASE + ["--device", "mps"], None, "--device 'mps' is not a device; use auto, cpu, cuda or cuda:N"),
    ("device xpu:1", BASE + ["--device", "xpu:1"], None, "--device 'xpu:1' is not a device; use auto, cpu, cuda or cuda:N"),
    ("betas length", BASE + ["--adam-betas", "0.9"], None, "--adam-betas must be 2 comma-separated numbers"),
    ("unknown flag", BASE + ["--n-latent", "4"], None, "unrecognized arguments: --n-latent 4 (--n-latent: did you mean "
                                                       "--n-latents"),
    ("validate: batch_size", BASE + ["--batch-size", "0"], None, "TrainConfig.batch_size must be a positive int, got 0"),
    ("validate: total_tokens", BASE + ["--total-tokens", "100", "--batch-size", "128"], None,
     "TrainConfig.total_tokens=100 is less than one batch (batch_size=128)"),
    ("validate: dead_strategy", BASE + ["--dead-strategy", "magic"], None, "'magic' is not one of none, resample"),
    ("auxk for relu", ["--data", "{x}", "--n-latents", "8", "--architecture", "relu", "--l1-coeff", "1",
                       "--dead-strategy", "auxk", "--out", "{tmp}/o", "--eval-tokens", "0", "--batch-size", "64",
                       "--total-tokens", "64"], None,
     "dead_strategy 'auxk' needs a topk, batchtopk or matryoshka_batchtopk dictionary"),
    ("nowhere to save", ["--data", "{x}", "--n-latents", "8", "--k", "2"], None, "nowhere to save the dictionary"),
    ("out is a file", ["--data", "{x}", "--n-latents", "8", "--k", "2", "--out", "{root}/notes.txt"], None,
     "--out {root}/notes.txt is a file, not a folder"),
    ("resume without dir", BASE + ["--resume"], None, "--resume needs --checkpoint-dir"),
    ("used checkpoint dir", BASE + ["--checkpoint-dir", "{root}/used_ckpt"], None,
     "already holds checkpoints (newest step_000000001) from an earlier run: pass --resume"),
    ("bad device", BASE + ["--device", "toaster"], None, "--device 'toaster' is not a device"),
    ("cannot fit in memory", BASE[:2] + ["--n-latents", "100000000000", "--k", "2", "--eval-tokens", "0", "--out",
                                         "{tmp}/o"], None,
     "--n-latents 100000000000 with --batch-size 4096 needs about 6.8e+04 GiB (parameters 1.23e+04 GiB, "
     "adam_moments 2.46e+04 GiB"),
    ("folder without manifest", ["--data", "{root}/empty_dir", *BASE[2:]], None, "no manifest.json in"),
    ("unknown file type", ["--data", "{root}/notes.txt", *BASE[2:]], None, "unknown activation file type '.txt'"),
    ("transcoder without targets", BASE + ["--transcoder"], None, "--transcoder needs targets"),
    ("targets rows", BASE + ["--targets", "{root}/y_short.npy"], None,
     "has 100 rows but --data {x} has 3000; targets pair with inputs row by row"),
    ("targets with shards", ["--data", "{root}/shards", *BASE[2:], "--targets", "{root}/y.npy"], None,
     "--targets applies only when --data is a .npy file"),
    ("eval split too big", BASE + ["--eval-tokens", "5000"], None,
     "--eval-tokens 5000 would hold out all 3000 rows of --data"),
    ("config missing", ["--config", "{tmp}/none.yaml"], None, "--config {tmp}/none.yaml: no such file"),
    ("yaml unknown key", ["--config", "{tmp}/cfg.yaml"], "data: {x}\nn_latent: 8\n",
     "{tmp}/cfg.yaml: unknown key 'n_latent'; did you mean n_latents?"),
    ("yaml wrong type", ["--config", "{tmp}/cfg.yaml"], "n_latents: lots\n",
     "{tmp}/cfg.yaml: 'n_latents' must be an int, got 'lots'"),
    ("yaml int beyond 64 bits", ["--config", "{tmp}/cfg.yaml"], "data: {x}\nn_latents: 8\nk: 2\nseed: 99999999999999999999999\n",
     "{tmp}/cfg.yaml: 'seed': 99999999999999999999999 does not fit in 64 bits (an int must lie within "
     "+-9,223,372,036,854,775,807)"),
    ("yaml bool type", ["--config", "{tmp}/cfg.yaml"], "progress: sometimes\n",
     "'progress' must be true or false, got 'sometimes'"),
    ("yaml list type", ["--config", "{tmp}/cfg.yaml"], "adam_betas: [0.9, x]\n",
     "'adam_betas' must be a list of 2 numbers"),
    ("yaml malformed", ["--config", "{tmp}/cfg.yaml"], "n_latents: [8\n", "{tmp}/cfg.yaml: not valid YAML:"),
    ("yaml not a mapping", ["--config", "{tmp}/cfg.yaml"], "- 8\n- 2\n", "expected a mapping of settings"),
    ("yaml value rejected", ["--config", "{tmp}/cfg.yaml", "--out", "{tmp}/o"],
     "data: {x}\nn_latents: 8\nk: 2\nlr_decay_fraction: 2\n", "TrainConfig.lr_decay_fraction must be in [0, 1]"),
    # --model/--dataset
    ("--data with --model", BASE + ["--model", "{root}/lm"], None,
     "--data and --model exclude each other: --data trains on stored activations, --model with --dataset computes "
     "them from text"),
    ("--model without --dataset", LM[:2] + LM[4:], None, "--dataset is required with --model"),
    ("--model unknown", ["--model", "gpt-17", *LM[2:]], None,
     "--model gpt-17: neither a known model (smollm2-135m) nor a folder"),
    ("--model not a model folder", ["--model", "{root}/empty_dir", *LM[2:]], None,
     "--model {root}/empty_dir: the folder has no config.json"),
    ("dataset file missing", LM[:2] + ["--dataset", "{root}/nope.jsonl"] + LM[4:], None,
     "--dataset: dataset {root}/nope.jsonl: no such file or directory"),
    ("dataset of unknown type", LM[:2] + ["--dataset", "{x}"] + LM[4:], None,
     "--dataset: dataset {x}: unknown file type '.npy'"),
    ("empty dataset", LM[:2] + ["--dataset", "{root}/empty.txt"] + LM[4:], None,
     "--dataset {root}/empty.txt holds no text to make one context of --context-len 16 tokens"),
    ("wrong text field", LM + ["--text-field", "content"], None,
     "has no text field 'content' (found: body); pass the right one as text_field (--text-field)"),
    ("unknown hook", LM + ["--hook", "model.layer.0.mlp"], None,
     "--hook path 'model.layer.0.mlp' matches no module of LlamaForCausalLM; close module names: model.layers.0.mlp"),
    ("unknown input hook", LM + ["--hook", "model.layers.1", "--input-hook", "model.layers.0.mlpp:input"], None,
     "--input-hook path 'model.layers.0.mlpp' matches no module"),
    ("dataset too small", LM + ["--eval-contexts", "1000"], None,
     "--eval-contexts 1000 holds out the first ones and leaves none to train on"),
    ("context too short", LM + ["--context-len", "2"], None,
     "--context-len must be an int >= 3"),
    ("cache dtype without cache", LM + ["--cache-dtype", "bfloat16"], None,
     "--cache-dtype applies with --cache DIR"),
    ("cache dtype unknown", LM + ["--cache", "{tmp}/c", "--cache-dtype", "bf16"], None,
     "--cache-dtype must be one of float32, float16, bfloat16, got 'bf16'"),
    ("transcoder without input hook", LM + ["--transcoder"], None,
     "--transcoder with --model needs --input-hook"),
    ("targets with --model", LM + ["--targets", "{root}/y.npy"], None,
     "--targets applies with --data"),
]


@pytest.mark.parametrize("args, config, expected", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_clear_line(files, tmp_path, capsys, args, config, expected):
    names = {"x": files / "x.npy", "root": files, "tmp": tmp_path}
    if config is not None:
        (tmp_path / "cfg.yaml").write_text(config.format(**names))
    assert call(*(a.format(**names) for a in args), "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsekit train: ") and err.count("\n") == 1, err
    assert expected.format(**names) in err, err


def test_resume_past_a_forged_newest_checkpoint_uses_the_newest_valid_one(files, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = ["--data", files / "x.npy", "--n-latents", 32, "--k", 3, "--checkpoint-dir", ckpt, *QUICK]
    assert call(*args) == 0
    newest = ckpt / "step_000000010"
    state = json.loads((newest / "state.json").read_text())
    state["sae_config"]["n_latents"] = 64  # as if written by another run; its own checksum is now stale
    (newest / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert call(*args, "--resume", "--out", tmp_path / "resumed") == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "step_000000010" in captured.err
    assert f"resumed from {ckpt / 'step_000000009'}" in captured.err
