"""The C++ sparse decode (csrc/sparse_products.hpp coo_times_dense, behind sparse_decode_cpu): entries
already in row order are read in place, others are bucketed by row first, and the bias is added as
each row is written. Every path must give the same bits: each output element is summed from zero in
entry order, then the bias added."""
import pytest
import torch

from sparsekit import ops
from sparsekit.ops.backend import _C

# Widths around the kernel's register blocks (32, 64 or 256 floats per block, by ISA): below one,
# exact multiples, and a ragged tail after whole blocks.
WIDTHS = [1, 7, 32, 64, 100, 256, 512, 515]


def codes(seed: int, batch: int, n: int, per_row_max: int, dtype=torch.float32):
    """Row-ordered COO codes with empty rows, duplicate (row, col) entries and zero values."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, per_row_max + 1, (batch,), generator=gen)
    counts[::5] = 0  # rows with no entries
    rows = torch.repeat_interleave(torch.arange(batch), counts)
    cols = torch.randint(0, n, rows.shape, generator=gen)
    if rows.numel() > 3:
        cols[1::4] = cols[0::4][: cols[1::4].numel()]  # duplicates: the same latent twice in a row
    values = torch.randn(rows.shape, generator=gen, dtype=dtype)
    values[::7] = 0.0
    values[3::11] = -0.0
    return values, rows, cols


def interleaved(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation of the entries that mixes rows but keeps each row's entries in their order."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(rows.shape, generator=gen, dtype=torch.float64)
    order = torch.argsort(keys)  # random positions...
    # ...then, within each row, hand that row's positions back out in the original entry order
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.numel())
    out = torch.empty_like(order)
    for r in rows.unique():
        mine = (rows == r).nonzero().flatten()
        out[positions[mine].sort().values] = mine
    return out


def decode(values, rows, cols, W, bias, batch):
    out = torch.empty(batch, W.shape[1], dtype=W.dtype)
    _C.coo_times_dense(values.numpy(), rows.numpy(), cols.numpy(), W.numpy(), out.numpy(),
                       None if bias is None else bias.numpy())
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", WIDTHS)
def test_row_ordered_and_shuffled_entries_decode_to_the_same_bits(d, dtype):
    batch, n = 23, 50
    values, rows, cols = codes(d, batch, n, 9, dtype)
    gen = torch.Generator().manual_seed(d + 1)
    W = torch.randn(n, d, generator=gen, dtype=dtype)
    bias = torch.randn(d, generator=gen, dtype=dtype)
    perm = interleaved(rows, d)
    assert not bool((rows[perm][1:] >= rows[perm][:-1]).all())  # the bucketed path runs
    in_order = decode(values, rows, cols, W, bias, batch)
    shuffled = decode(values[perm], rows[perm], cols[perm], W, bias, batch)
    assert torch.equal(bits(in_order), bits(shuffled))


@pytest.mark.parametrize("d", WIDTHS)
def test_the_fused_bias_is_the_bias_added_after_the_sum(d):
    batch, n = 17, 40
    values, rows, cols = codes(100 + d, batch, n, 6)
    gen = torch.Generator().manual_seed(d)
    W = torch.randn(n, d, generator=gen)
    bias = torch.randn(d, generator=gen)
    bias[::3] = -0.0
    fused = decode(values, rows, cols, W, bias, batch)
    after = decode(values, rows, cols, W, None, batch) + bias
    assert torch.equal(bits(fused), bits(after))
    empty = (torch.bincount(rows, minlength=batch) == 0).nonzero().flatten()
    assert empty.numel() > 0 and torch.equal(bits(fused[empty]), bits((torch.zeros(d) + bias).expand(empty.numel(), d)))


@pytest.mark.parametrize("d", [7, 256, 515])
def test_decode_matches_the_float64_sum(d):
    batch, n = 31, 64
    values, rows, cols = codes(200 + d, batch, n, 12)
    gen = torch.Generator().manual_seed(d)
    W, bias = torch.randn(n, d, generator=gen), torch.randn(d, generator=gen)
    expected = torch.zeros(batch, d, dtype=torch.float64).index_add_(0, rows, values.double()[:, None] * W.double()[cols])
    torch.testing.assert_close(decode(values, rows, cols, W, bias, batch).double(), expected + bias.double(),
                               rtol=1e-5, atol=1e-5)


def test_topk_decode_through_the_op_door_keeps_its_bits_when_its_entries_come_shuffled(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    batch, n, d, k = 40, 300, 96, 8
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(batch, k, generator=gen).abs()
    indices = torch.randint(0, n, (batch, k), generator=gen)
    W, bias = torch.randn(n, d, generator=gen), torch.randn(d, generator=gen)
    y = ops.sparse_decode(values, indices, W, bias)
    rows = torch.arange(batch).repeat_interleave(k)
    perm = interleaved(rows, 6)
    y_coo = ops.sparse_decode_coo(values.reshape(-1)[perm], rows[perm], indices.reshape(-1)[perm], W, bias, batch)
    assert torch.equal(bits(y), bits(y_coo))


def test_a_bias_of_the_wrong_width_is_refused():
    values, rows, cols = codes(0, 4, 10, 3)
    W = torch.randn(10, 8)
    with pytest.raises(ValueError, match="bias"):
        decode(values, rows, cols, W, torch.zeros(9), 4)


@pytest.mark.parametrize("where,bad", [("rows", -1), ("rows", 4), ("cols", -3), ("cols", 10), ("cols", -(2**63))])
def test_an_index_out_of_range_is_refused_naming_its_array(where, bad):
    values, rows, cols = codes(1, 4, 10, 3)
    arrays = {"rows": rows.clone(), "cols": cols.clone()}
    arrays[where][len(arrays[where]) // 2] = bad
    with pytest.raises(ValueError, match=rf"{where} holds an index outside \[0, {4 if where == 'rows' else 10}\)"):
        decode(values, arrays["rows"], arrays["cols"], torch.randn(10, 8), None, 4)
