"""Issue 21, class 9: CLI edges. An integer beyond 64 bits (on any int flag of any command, or in a
`--config` file) and a device this machine cannot train on are refused up front, before any data is
read or folder made: exit status 2 and one line naming the flag. The int bound is one check
(``sparsekit.cli.parser.check_int64``, used by ``train``'s converter and the ``int64``/``positive``
argument types of the other commands); the device check is ``train_common.choose_device``.

Each case runs in a forked child under a memory cap and a timeout (tests/helpers/forked.py), so a
value that slipped through and started a 10**22-step run ends as a failed case, not a hung suite;
two cases run the real `python -m sparsekit` in a child process (tests/helpers/hostile.py).
Values beyond 64 bits are drawn from a fresh seed, named when a case fails."""
import functools
import random

import pytest
import torch
from helpers import forked, hostile

from sparsekit.cli import train as train_cli
from sparsekit.cli.parser import INT64_MAX
from sparsekit.cli.train_common import UsageError, choose_device

SEED = hostile.fresh_seed()
RNG = random.Random(SEED)
NO_CUDA = not torch.cuda.is_available()


def beyond_64_bits(rng: random.Random) -> int:
    """A fresh int outside the signed 64-bit range, either sign, up to 40 digits."""
    magnitude = rng.randrange(INT64_MAX + 1, 10 ** rng.randrange(20, 41))
    return magnitude if rng.random() < 0.7 else -magnitude - 1


one_line = functools.partial(forked.one_line, seed=SEED, max_len=400)  # the stderr line of an exit-2 run


def train(data, out, *extra):
    base = {"--data": data, "--out": out, "--n-latents": "16", "--k": "2", "--total-tokens": "256",
            "--batch-size": "64", "--eval-tokens": "0"}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    return forked.cli("train", *[str(x) for pair in base.items() for x in pair], "--no-progress")


# --- integers beyond 64 bits ----------------------------------------------------------------------

INT_FLAGS = ["--n-latents", "--k", "--seed", "--batch-size", "--total-tokens", "--eval-tokens", "--log-every",
             "--checkpoint-every-tokens", "--latent-parallel", "--aux-k", "--dead-window-tokens", "--lr-warmup-tokens"]


@pytest.mark.parametrize("flag", INT_FLAGS)
def test_an_int_flag_beyond_64_bits_is_refused_naming_the_flag(data, tmp_path, flag):
    value = beyond_64_bits(RNG)
    one_line(train(data, tmp_path / "out", flag, value), f"sparsekit train: {flag}: {value} does not fit in 64 bits")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--n-latents", "--seed", "--batch-size"])
def test_an_int_flag_of_thousands_of_digits_is_refused_without_converting_it(data, tmp_path, flag):
    digits = RNG.randrange(4301, 200_000)  # past Python's int-from-string limit (4,300 digits)
    one_line(train(data, tmp_path / "out", flag, "9" * digits),
             f"{flag}: an integer of {digits:,} digits does not fit in 64 bits")


@pytest.mark.parametrize("key", ["n_latents", "seed", "batch_size", "total_tokens"])
def test_a_config_int_beyond_64_bits_is_refused_naming_the_key(data, tmp_path, key):
    value = beyond_64_bits(RNG)
    (tmp_path / "cfg.yaml").write_text(f"{key}: {value}\n")
    one_line(train(data, tmp_path / "out", "--config", tmp_path / "cfg.yaml"),
             f"cfg.yaml: '{key}': {value} does not fit in 64 bits")


def test_a_config_float_that_is_a_whole_number_beyond_64_bits_is_refused(data, tmp_path):
    (tmp_path / "cfg.yaml").write_text("batch_size: 1.0e+30\n")
    one_line(train(data, tmp_path / "out", "--config", tmp_path / "cfg.yaml"),
             "'batch_size': 1000000000000000019884624838656 does not fit in 64 bits")


def test_a_list_element_beyond_64_bits_is_refused_on_the_flag_and_in_the_config(data, tmp_path):
    value = beyond_64_bits(RNG)
    one_line(train(data, tmp_path / "out", "--architecture", "matryoshka_batchtopk", "--matryoshka-widths",
                   f"4,{value}"), f"--matryoshka-widths: {value} does not fit in 64 bits")
    (tmp_path / "cfg.yaml").write_text(f"architecture: matryoshka_batchtopk\nmatryoshka_widths: [4, {value}]\n")
    one_line(train(data, tmp_path / "out", "--config", tmp_path / "cfg.yaml"),
             f"'matryoshka_widths': {value} does not fit in 64 bits")


def test_the_largest_64_bit_ints_are_accepted_by_the_converter():
    settings = train_cli.resolve(["--seed", str(INT64_MAX), "--n-latents", str(-INT64_MAX - 1)])
    assert settings["seed"] == INT64_MAX and settings["n_latents"] == -INT64_MAX - 1
    with pytest.raises(UsageError, match="--seed: 9223372036854775808 does not fit in 64 bits"):
        train_cli.resolve(["--seed", str(INT64_MAX + 1)])


OTHER_COMMANDS = {
    "demo --synthetic --seed": ["demo", "--synthetic", "--seed"],
    "mnist --seed": ["mnist", "--seed"],
    "mnist --epochs": ["mnist", "--epochs"],
    "toys attention --seed": ["toys", "attention", "--seed"],
    "toys sparse-base --seed": ["toys", "sparse-base", "--seed"],
    "lm-demo --n-latents": ["lm-demo", "--n-latents"],
    "lm-demo --batch-size": ["lm-demo", "--batch-size"],
}


@pytest.mark.parametrize("command", list(OTHER_COMMANDS))
def test_every_command_refuses_an_int_beyond_64_bits_in_one_line(command):
    value = beyond_64_bits(RNG)
    argv = OTHER_COMMANDS[command]
    err = one_line(forked.cli(*argv, value), f"argument {argv[-1]}: {value} does not fit in 64 bits")
    assert "usage:" not in err


def test_the_real_command_refuses_a_seed_beyond_64_bits(data, tmp_path):
    value = beyond_64_bits(RNG)
    result = hostile.run_capped(["-m", "sparsekit", "train", "--data", str(data), "--n-latents", "8", "--k", "2",
                                 "--out", str(tmp_path / "out"), "--seed", str(value)], timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, f"seed {SEED}: {result.stderr}"
    assert f"--seed: {value} does not fit in 64 bits" in result.stderr and "Traceback" not in result.stderr


# --- devices --------------------------------------------------------------------------------------

NOT_DEVICES = ["tpu", "meta", "xla", "mps", "cuda:", "cuda:-1", "CUDA", "cuda:0:1", "cuda:0.5", "gpu", "", "cpu,cuda",
               "cuda:" + "9" * 30, "💥"]


@pytest.mark.parametrize("device", NOT_DEVICES)
def test_a_device_sparsekit_cannot_train_on_is_refused_naming_the_flag(data, tmp_path, device):
    one_line(train(data, tmp_path / "out", "--device", device), f"--device {device!r} is not a device",
             "use auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, expected", [("cpu:3", "there is one CPU device"),
                                              ("auto:1", "auto takes no index")])
def test_an_index_on_cpu_or_auto_is_refused(data, tmp_path, device, expected):
    one_line(train(data, tmp_path / "out", "--device", device), f"--device {device}: {expected}")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda_is_refused_up_front(data, tmp_path, device):
    one_line(train(data, tmp_path / "out", "--device", device), f"--device {device}: CUDA is not available")


def test_a_device_in_the_config_is_checked_the_same_way(data, tmp_path):
    (tmp_path / "cfg.yaml").write_text("device: meta\n")
    one_line(train(data, tmp_path / "out", "--config", tmp_path / "cfg.yaml"), "--device 'meta' is not a device")


def test_a_bad_device_is_refused_before_the_data_is_read(tmp_path):
    (tmp_path / "garbage.npy").write_bytes(random.Random(SEED).randbytes(4096))  # reading it would fail first
    outcome = train(tmp_path / "garbage.npy", tmp_path / "out", "--device", "tpu")
    one_line(outcome, "--device 'tpu' is not a device")


def with_gpus(count: int, name: str):
    """choose_device(name) as it runs on a machine with `count` CUDA devices (torch.cuda patched)."""
    torch.cuda.is_available, torch.cuda.device_count = (lambda: count > 0), (lambda: count)
    try:
        return str(choose_device(name))
    except UsageError as error:
        return f"UsageError: {error}"


@pytest.mark.parametrize("count, name, expected", [
    (1, "cuda:7", "UsageError: --device cuda:7: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    (2, "cuda:2", "UsageError: --device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    (8, "cuda:" + "9" * 18, "UsageError: --device cuda:999999999999999999: this machine has 8 CUDA device(s)"),
    (2, "cuda:1", "cuda:1"),
    (1, "cuda", "cuda"),
    (1, "auto", "cuda"),
])
def test_a_cuda_index_is_checked_against_the_devices_present(count, name, expected):
    outcome = forked.run(with_gpus, count, name)
    assert outcome.status == "returned" and expected in outcome.value, outcome


def test_the_real_command_refuses_meta_in_one_line(data, tmp_path):
    result = hostile.run_capped(["-m", "sparsekit", "train", "--data", str(data), "--n-latents", "8", "--k", "2",
                                 "--out", str(tmp_path / "out"), "--device", "meta"], timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--device 'meta' is not a device" in result.stderr and not (tmp_path / "out").exists()
