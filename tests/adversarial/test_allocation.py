"""Allocation before validation (issue 21, class 6), the part fixed so far: a saved dictionary whose
cfg.json asks for sizes its weights file cannot hold is refused before anything is built, in one line
naming the file; loading runs in a child process under a memory cap, where the old path would have
tried to allocate what cfg.json asked for."""
import json
import random

import pytest
from helpers import hostile

import sparsekit

LOAD = "import sys, sparsekit\ntry:\n    sparsekit.load(sys.argv[1])\nexcept ValueError as e:\n    print(e)\n"


@pytest.mark.parametrize("field, value", [("n_latents", 10**11), ("d_in", 10**10), ("d_out", 10**12),
                                          ("n_latents", 2**40)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sizes_the_weights_cannot_hold_are_refused_before_allocation(tmp_path, field, value, dtype):
    import torch
    sae = sparsekit.Transcoder(8, 16, 6, k=2, dtype=getattr(torch, dtype)) if field == "d_out" else \
        sparsekit.TopKSAE(8, 16, k=2, dtype=getattr(torch, dtype))
    sae.save(tmp_path / "sae")
    config_path = tmp_path / "sae" / "cfg.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    done = hostile.run_capped(["-c", LOAD, str(tmp_path / "sae")], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{config_path}: d_in=") and "nothing was allocated" in done.stdout, done.stdout
    assert f"{field}={value}" in done.stdout


def test_sizes_that_fit_but_disagree_still_get_the_shape_message(tmp_path):
    sae = sparsekit.TopKSAE(8, 16, k=2)
    sae.save(tmp_path / "sae")
    config_path = tmp_path / "sae" / "cfg.json"
    config = json.loads(config_path.read_text())
    config["n_latents"] = random.choice([8, 12, 20])
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape .* cfg.json implies"):
        sparsekit.load(tmp_path / "sae")


def test_a_true_dictionary_still_loads_identically(tmp_path):
    import torch
    sae = sparsekit.TopKSAE(8, 16, k=2, seed=hostile.fresh_seed())
    sae.save(tmp_path / "sae")
    loaded = sparsekit.load(tmp_path / "sae")
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
