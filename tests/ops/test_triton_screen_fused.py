"""TopK's bf16 screen with the candidates found in the screen GEMM's epilogue
(``screen.topk_encode_screened_fused``): the same codes as the screen through a written [B, n]
(``topk_encode_screened_passes``) bit for bit, and the reference's selection, on Gaussian data, exact
integer ties and near-ties below bf16's resolution, ragged B and n, with few keys kept per tile so that
rows run again; the truncated keys' ranges hold the GEMM's a; the switch back to the passes. Under
Triton's interpreter on CPU tensors, or natively where CUDA exists (``on_device``)."""
import pytest
import torch
from helpers.triton_device import fresh_generator, on_device

from sparsekit import ops
from sparsekit.kernels import fused_topk, screen
from sparsekit.kernels.gemm import gemm


def block_n() -> int:
    return fused_topk.tile_config(torch.bfloat16)["BLOCK_N"]


def assert_same(got, want, what=""):
    assert torch.equal(got[1], want[1]), f"{what}: indices differ"
    assert torch.equal(got[0], want[0]), f"{what}: values differ"


def float64_sets(x, W, b, k):
    return (x.double() @ W.double() + b.double()).topk(k, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("kt", [None, 1, 2])
def test_fused_screen_selects_what_the_screen_through_a_written_matrix_selects(kt):
    gen = fresh_generator()
    bn = block_n()
    for batch, d, n, k in [(5, 24, 3 * bn + 7, 6), (18, 9, 2 * bn, 3), (3, 40, bn + 1, bn + 1)]:
        x = torch.randn(batch, d, generator=gen)
        W = torch.randn(d, n, generator=gen) / d**0.5
        b = torch.randn(n, generator=gen) * 0.1
        x, W, b = on_device(x, W, b)
        got = screen.topk_encode_screened_fused(x, W, b, k, kt=kt)
        assert_same(got, screen.topk_encode_screened_passes(x, W, b, k), f"B={batch} n={n} k={k} kt={kt}")
        if k <= 3:  # the leading few of Gaussian data lie far apart: float64 picks the same set
            assert torch.equal(got[1].sort(dim=1).values, float64_sets(x, W, b, k))
        assert torch.all(got[0][:, :-1] >= got[0][:, 1:])


def test_rows_whose_candidates_crowd_one_tile_run_again_and_stay_exact():
    gen = fresh_generator()
    bn = block_n()
    batch, d, n, k = 6, 16, 5 * bn, 4  # kt * tiles >= k: kt=1 stands
    base = torch.randn(d, generator=gen)
    x = base + 0.1 * torch.randn(batch, d, generator=gen)
    W = torch.randn(d, n, generator=gen) * 0.01
    # ten leading columns, all in the second tile, 1% apart: more candidates there than kt=1 keeps
    W[:, bn:bn + 10] = base[:, None] * (1.0 + 0.01 * torch.randperm(10, generator=gen).float())[None, :]
    x, W, b = on_device(x, W, torch.zeros(n))
    before = screen.stats["overflow_rows"]
    got = screen.topk_encode_screened_fused(x, W, b, k, kt=1)
    assert screen.stats["overflow_rows"] > before
    assert_same(got, screen.topk_encode_screened_passes(x, W, b, k))


def test_fused_screen_on_exact_integer_ties_equals_the_unscreened_float32_path(monkeypatch):
    gen = fresh_generator()
    bn = block_n()
    batch, d, n, k = 7, 12, 6 * bn + 5, 5
    x = torch.randint(-3, 4, (batch, d), generator=gen).float()
    W = torch.randint(-3, 4, (d, n), generator=gen).float()
    W[:, : bn + 4] = W[:, bn + 4: bn + 5]  # exact ties across tiles, more than k of them per tile
    b = torch.randint(-5, 6, (n,), generator=gen).float()
    b[: bn + 5] = 1000
    x, W, b = on_device(x, W, b)
    got = screen.topk_encode_screened_fused(x, W, b, k, kt=1)
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "off")
    want = ops.topk_encode(x, W, b, k)
    assert torch.equal(got[1], want.indices) and torch.equal(got[0], want.values)
    assert torch.equal(got[1], torch.arange(k, device=got[1].device).expand(batch, k))  # ties: lowest columns


def test_fused_screen_orders_near_ties_below_bf16_resolution_as_float64():
    gen = fresh_generator()
    d, n, k = 32, 6 * block_n() + 3, 6
    x = torch.randn(5, d, generator=gen)
    x = x * torch.sign(x @ torch.ones(d))[:, None]
    W = torch.randn(d, n, generator=gen) * 0.02
    # 40 columns equal in bf16, 1e-5 apart in float32 (bf16's spacing is ~4e-3), spread over the tiles
    spread = torch.randperm(n, generator=gen)[:40]
    W[:, spread] = (torch.ones(d) + 0.1 * torch.randn(d, generator=gen))[:, None] * (
        1.0 + 1e-5 * torch.randperm(40, generator=gen).float())[None, :]
    x, W, b = on_device(x, W, torch.zeros(n))
    for kt in (1, None):
        got = screen.topk_encode_screened_fused(x, W, b, k, kt=kt)
        assert torch.equal(got[1].sort(dim=1).values, float64_sets(x, W, b, k)), f"kt={kt}"
        assert_same(got, screen.topk_encode_screened_passes(x, W, b, k), f"kt={kt}")


def test_truncated_keys_bracket_the_screen_gemms_float32_values():
    gen = fresh_generator()
    bn = block_n()
    batch, d, n, kt = 9, 20, 2 * bn + 3, 3
    x = torch.randn(batch, d, generator=gen) * 1e3
    W = torch.randn(d, n, generator=gen)
    b = torch.randn(n, generator=gen)
    x, W, b = on_device(x, W, b)
    xb, Wb = x.bfloat16(), W.bfloat16()
    tile = fused_topk.tile_for(xb, Wb)
    a = gemm(xb, Wb, b, out_dtype=torch.float32, tile=tile).double()
    keys, following = fused_topk.candidate_keys(xb, Wb, b, kt, True, tile, value_f32=True)
    lo, hi, cols, real = screen._truncated_range(keys, bn - 1)
    rows = torch.arange(batch, device=x.device)[:, None].expand_as(cols)
    held = a[rows[real], cols[real]]
    assert torch.all(lo[real] <= held) and torch.all(held <= hi[real])
    assert torch.all(hi[real] - lo[real] <= held.abs() * 2.0**-14 + 1e-30)  # truncated by 8 bits at most
    # every unkept entry of a tile is <= its next key's hi
    next_hi, next_real = screen._truncated_range(following, bn - 1)[1::2]
    next_hi = torch.where(next_real, next_hi, float("inf"))  # a tile that kept all its entries
    kept = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    kept[rows[real], cols[real]] = True
    tile_of = torch.arange(n, device=x.device) // bn
    assert torch.all(torch.where(kept, float("-inf"), a) <= next_hi[:, tile_of])


def test_fused_screen_falls_back_when_a_could_overflow():
    x, W, b = on_device(torch.full((2, 4), 1e30), torch.full((4, 40), 1e10), torch.zeros(40))
    assert screen.topk_encode_screened_fused(x, W, b, 2) is None


def test_the_screen_takes_the_passes_when_asked_and_refuses_an_unknown_choice(monkeypatch):
    calls = []
    monkeypatch.setattr(screen, "topk_encode_screened_fused", lambda *a, **k: calls.append("fused"))
    monkeypatch.setattr(screen, "topk_encode_screened_passes", lambda *a, **k: calls.append("passes"))
    x = torch.zeros(1, 1)
    screen.topk_encode_screened(x, x, x[0], 1)
    monkeypatch.setenv("SPARSEKIT_GPU_SCREEN_SELECT", "passes")
    screen.topk_encode_screened(x, x, x[0], 1)
    assert calls == ["fused", "passes"]
    monkeypatch.setenv("SPARSEKIT_GPU_SCREEN_SELECT", "sometimes")
    with pytest.raises(RuntimeError, match="SPARSEKIT_GPU_SCREEN_SELECT"):
        screen.topk_encode_screened(x, x, x[0], 1)


def test_keys_kept_per_tile_leave_room_for_the_candidates_and_never_exceed_the_tile():
    assert screen.screen_kt(131072, 64, 128) == 4  # ~256 candidates/row: 0.7% of rows run again
    assert screen.screen_kt(1000, 500, 128) == 128
    for n, k in [(4096, 8), (32768, 32), (262144, 128)]:
        assert 1 <= screen.screen_kt(n, k, 128) <= 128


def test_split_norms_rounds_to_bf16_as_torch_and_gives_the_bounds_norms_over_a_wide_range():
    # one pass: bf16(t) bit for bit as torch rounds (ties to even at midpoints, tiny and huge values,
    # a transposed view written with its strides) and per column the norms column_norms computes
    gen = fresh_generator()
    d, n = 37, 70
    t = torch.randn(d, n, generator=gen) * torch.logspace(-25, 15, n)[None, :]
    t[0, :8] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 2.0**-130, -2.0**-140,
                             3.0e38, 1.0 + 2.0**-8 + 2.0**-20, 0.0])
    t, = on_device(t)
    for view in (t, t.t()):
        rounded, norms = screen.split_norms(view)
        assert rounded.stride() == view.stride()
        assert torch.equal(rounded.view(torch.int16), view.bfloat16().view(torch.int16))
        want = screen.column_norms(view)
        assert torch.allclose(norms, want, rtol=1e-13, atol=0.0)
