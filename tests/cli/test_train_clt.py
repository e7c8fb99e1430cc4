"""`sparsekit train-clt`: listed among the commands; its flags parse layer ranges and counts, and a bad
value is one line on stderr with exit status 2 (the run itself loads SmolLM2: see docs/training.md for
its figures)."""
import pytest

from sparsekit.cli import COMMANDS, main
from sparsekit.cli.train_clt import parse, parse_layer_range


def test_train_clt_is_a_listed_command(capsys):
    assert "train-clt" in COMMANDS
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "train-clt" in capsys.readouterr().out


def test_layer_ranges_and_counts_parse():
    assert parse_layer_range("3-8") == [3, 4, 5, 6, 7, 8] and parse_layer_range("2,3") == [2, 3]
    args = parse(["--layers", "0-2", "--train-tokens", "2e5", "--latents-per-layer", "512", "--k", "8", "--reach", "1"])
    assert (args.layers, args.train_tokens, args.latents_per_layer, args.k, args.reach) == ([0, 1, 2], 200_000, 512, 8, 1)
    assert parse([]).reach is None


@pytest.mark.parametrize("argv, message", [
    (["--layers", "3-x"], "expected a layer range such as 3-8 or 3,4,5, got '3-x'"),
    (["--layers", "3,5"], "expected consecutive layers >= 0 such as 3-8, got '3,5'"),
    (["--train-tokens", "1.5"], "expected a positive whole count, got '1.5'"),
    (["--k", "64", "--latents-per-layer", "32"], "--k 64 exceeds --latents-per-layer 32"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--aux-coeff", "-1"], "--aux-coeff must be a number >= 0, got -1.0"),
])
def test_bad_flags_are_one_line_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train-clt", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
