"""Dictionary constructors refuse a bad dtype, device or seed with a ValueError naming the argument."""
import pytest
import torch

import sparsekit

CONSTRUCTORS = {
    "topk": lambda **kw: sparsekit.TopKSAE(8, 16, 2, **kw),
    "relu": lambda **kw: sparsekit.ReLUSAE(8, 16, 1e-3, **kw),
    "batchtopk": lambda **kw: sparsekit.BatchTopKSAE(8, 16, 2, **kw),
    "jumprelu": lambda **kw: sparsekit.JumpReLUSAE(8, 16, 1e-3, **kw),
    "transcoder": lambda **kw: sparsekit.Transcoder(8, 16, 4, 2, **kw),
}
BAD = [
    ("dtype", "float32", "dtype must be a floating torch.dtype"),
    ("dtype", torch.int64, "dtype must be a floating torch.dtype"),
    ("device", "gpu0", "device must be a torch.device"),
    ("device", 3.5, "device must be a torch.device"),
    ("seed", 1.5, "seed must be a non-negative int"),
    ("seed", True, "seed must be a non-negative int"),
    ("seed", -1, "seed must be a non-negative int"),
]


@pytest.mark.parametrize("architecture", CONSTRUCTORS)
@pytest.mark.parametrize("argument, value, message", BAD, ids=[f"{a}={v!r}" for a, v, _ in BAD])
def test_bad_constructor_argument_is_a_value_error_naming_it(architecture, argument, value, message):
    with pytest.raises(ValueError, match=message):
        CONSTRUCTORS[architecture](**{argument: value})


@pytest.mark.parametrize("architecture", CONSTRUCTORS)
def test_good_dtype_device_and_seed_are_accepted(architecture):
    sae = CONSTRUCTORS[architecture](dtype=torch.float64, device="cpu", seed=3)
    assert sae.W_enc.dtype == torch.float64 and sae.W_enc.device.type == "cpu"
    again = CONSTRUCTORS[architecture](dtype=torch.float64, device=torch.device("cpu"), seed=3)
    assert torch.equal(sae.W_dec, again.W_dec)
