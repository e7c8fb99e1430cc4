"""TopK with the selection fused into the GEMM's epilogue (kernels/sparsekit_kernels/fused_topk.py): the
same codes as the unfused path (GEMM, then radix select) bit for bit, and as reference.py's topk_encode
exactly on data where float arithmetic is exact, with ties and one-ulp near-ties, every top-k entry in one
tile (the overflow rerun), k above the tile width, ragged B and n, float32 and bfloat16, strided inputs.
Under Triton's interpreter on CPU tensors (tests/conftest.py), or natively on CUDA tensors where a GPU
exists (inputs drawn on the CPU and moved: ``on_device``); tile-dependent shapes follow the tile in use."""
import math

import pytest
import torch
from helpers.triton_device import fresh_generator, on_device

from sparsekit import ops
from sparsekit.kernels import fused_topk
from sparsekit.kernels.gemm import gemm
from sparsekit.kernels.select import topk_rows
from sparsekit.ops import reference

DTYPES = [torch.float32, torch.bfloat16]


def tile_n(dtype) -> int:
    return fused_topk.tile_config(dtype)["BLOCK_N"]


def tile_m(dtype) -> int:
    return fused_topk.tile_config(dtype)["BLOCK_M"]


def unfused(x, W, b, k):
    """The unfused path (GEMM writing pre, radix select) at the fused kernel's tile config: the same
    sums in the same order, so the same bits (autotuning might pick another tile on a GPU)."""
    return topk_rows(gemm(x, W, b, tile=fused_topk.tile_for(x, W)), k)


def assert_same_codes(got, want, what=""):
    assert torch.equal(got[1], want[1]), f"{what}: indices differ"
    assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0]), f"{what}: values differ"


def integer_case(gen, batch, d, n, dtype, duplicates=0):
    """Small integers (every product and sum exact in float32 and in the bf16 rounding of pre), with
    the first `duplicates` columns of W repeated from column `duplicates`: exact ties across columns."""
    x = torch.randint(-3, 4, (batch, d), generator=gen).float()
    W = torch.randint(-3, 4, (d, n), generator=gen).float()
    if duplicates:
        W[:, :duplicates] = W[:, duplicates:duplicates + 1]
    b = torch.randint(-5, 6, (n,), generator=gen).float()
    return on_device(x.to(dtype), W.to(dtype), b.to(dtype))


def shapes(dtype):
    """(batch, d, n, k): B and n off the tile grid, several tiles each way, k > BLOCK_N, k = 1, k = n."""
    bm, bn = tile_m(dtype), tile_n(dtype)
    return [(bm + 3, 21, 2 * bn + 6, 9), (5, 7, 3 * bn + 4, bn + 8), (3, 5, bn + 1, 1), (6, 9, 9, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_topk_equals_the_unfused_path_bit_for_bit_on_real_values(dtype):
    gen = fresh_generator()
    for batch, d, n, k in shapes(dtype):
        x = torch.randn(batch, d, generator=gen)
        W = torch.randn(d, n, generator=gen) / d**0.5
        b = torch.randn(n, generator=gen) * 0.1
        x, W, b = on_device(x.to(dtype), W.to(dtype), b.to(dtype))
        got = fused_topk.topk_encode_fused(x, W, b, k)
        assert_same_codes(got, unfused(x, W, b, k), f"B={batch} n={n} k={k}")
        assert torch.all(got[0][:, :-1] >= got[0][:, 1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_topk_equals_the_reference_on_exact_integers_with_ties(dtype):
    gen = fresh_generator()
    for batch, d, n, k in shapes(dtype):
        duplicates = min(n // 2, tile_n(dtype) + 8)
        x, W, b = integer_case(gen, batch, d, n, dtype, duplicates)
        b[: duplicates + 1] = 100  # the repeated columns lead every row, more of them than k per tile
        got = fused_topk.topk_encode_fused(x, W, b, k)
        assert_same_codes(got, reference.topk_encode(x, W, b, k), f"B={batch} n={n} k={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_topk_orders_one_ulp_near_ties_and_exact_ties_as_the_reference(dtype):
    # pre = x @ W + b with every term an integer: exact in float32 below 2^24, where its spacing (one
    # ulp) is 1 from 2^23 on; in bf16, 1 from 128 to 256 (no rounding of pre: the interpreter's float32
    # -> bf16 cast does not round to nearest as torch's does). Columns spread over every tile hold
    # values one ulp apart and exactly equal.
    gen = fresh_generator()
    batch, d, n, k = tile_m(dtype) + 1, 6, 3 * tile_n(dtype) + 5, 12
    top = 2.0**23 if dtype == torch.float32 else 128.0
    x = torch.randint(-1, 2, (batch, d), generator=gen).float()
    W = torch.randint(-1, 2, (d, n), generator=gen).float()
    b = torch.full((n,), -top)
    lead = torch.randperm(n, generator=gen)[:3 * k]
    b[lead] = top + 10.0 + torch.randint(0, 6, (3 * k,), generator=gen).float()  # many exact ties, 1 apart
    x, W, b = on_device(x.to(dtype), W.to(dtype), b.to(dtype))
    want = reference.topk_encode(x, W, b, k)
    assert int((want[0][:, :-1] == want[0][:, 1:]).sum()) > batch  # ties are being decided
    assert_same_codes(fused_topk.topk_encode_fused(x, W, b, k), want)
    assert_same_codes(fused_topk.topk_encode_fused(x, W, b, k, kt=1), want, "kt=1")
    assert_same_codes(unfused(x, W, b, k), want, "unfused")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rows_whose_top_k_all_sit_in_one_tile_overflow_and_are_selected_again_exactly(dtype):
    gen = fresh_generator()
    bn = tile_n(dtype)
    batch, d, n, k = 7, 5, 4 * bn + 3, 6
    x, W, b = integer_case(gen, batch, d, n, dtype)
    b = b.clone()
    b[2 * bn + 3: 2 * bn + 3 + 2 * k] += 200  # every row's top k: inside tile 2
    before = fused_topk.stats["overflow_rows"]
    got = fused_topk.topk_encode_fused(x, W, b, k, kt=2)
    assert fused_topk.stats["overflow_rows"] - before == batch  # each row's tile held more than 2 of them
    assert torch.all((got[1] >= 2 * bn) & (got[1] < 3 * bn))
    assert_same_codes(got, reference.topk_encode(x, W, b, k))
    assert_same_codes(got, unfused(x, W, b, k))


def test_rows_with_their_top_k_spread_over_tiles_pass_the_overflow_check_without_a_rerun():
    # Each row's top k sit one per tile: kt=1 lists them all and no tile's next key reaches the k-th.
    gen = fresh_generator()
    bn = tile_n(torch.float32)
    batch, d, tiles = 4, 3, 6
    x, W, b = integer_case(gen, batch, d, tiles * bn, torch.float32)
    b = b.clone()
    b[torch.arange(tiles) * bn + 1] += 200
    before = fused_topk.stats["overflow_rows"]
    got = fused_topk.topk_encode_fused(x, W, b, tiles, kt=1)
    assert fused_topk.stats["overflow_rows"] == before
    assert_same_codes(got, reference.topk_encode(x, W, b, tiles))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_topk_reads_strided_inputs_in_place(dtype):
    gen = fresh_generator()
    batch, d, n, k = tile_m(dtype) + 2, 13, 2 * tile_n(dtype) + 9, 7
    x_t = torch.randn(d, batch, generator=gen).to(dtype)          # x passed as a transpose
    W_wide = (torch.randn(d, 2 * n, generator=gen) / d**0.5).to(dtype)  # W_enc: every other column
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    x_t, W_wide, b = on_device(x_t, W_wide, b)
    x, W = x_t.t(), W_wide[:, ::2]
    assert not x.is_contiguous() and not W.is_contiguous()
    assert_same_codes(fused_topk.topk_encode_fused(x, W, b, k), unfused(x.contiguous(), W.contiguous(), b, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_topk_values_decode_exactly_across_the_float_range(dtype):
    # x = 0: pre = b exactly, so the values must come back bit for bit from the keys, at every magnitude.
    b = torch.tensor([3.0e38, -3.0e38, 1e-30, -1e-30, 1.0, -1.0, 0.0, 7.5e-8, 65504.0, 2.0**-100, -2.0**100, 3.0])
    x, W, b = on_device(torch.zeros(2, 3, dtype=dtype), torch.ones(3, b.numel(), dtype=dtype), b.to(dtype))
    for k in (1, 5, b.numel()):
        assert_same_codes(fused_topk.topk_encode_fused(x, W, b, k), reference.topk_encode(x, W, b, k), f"k={k}")


def test_topk_encode_runs_fused_by_default_and_unfused_when_asked(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    monkeypatch.delenv("SPARSEKIT_GPU_TOPK", raising=False)
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "off")
    gen = fresh_generator()
    x, W, b = integer_case(gen, 9, 8, 3 * tile_n(torch.float32), torch.float32, duplicates=20)
    calls = fused_topk.stats["calls"]
    fused = ops.topk_encode(x, W, b, 5)
    assert fused_topk.stats["calls"] == calls + 1
    monkeypatch.setenv("SPARSEKIT_GPU_TOPK", "unfused")
    old = ops.topk_encode(x, W, b, 5)
    assert fused_topk.stats["calls"] == calls + 1
    assert_same_codes(fused, old)
    monkeypatch.setenv("SPARSEKIT_GPU_TOPK", "sometimes")
    with pytest.raises(RuntimeError, match="SPARSEKIT_GPU_TOPK='sometimes'"):
        ops.topk_encode(x, W, b, 5)


def test_gradients_through_the_fused_encoder_equal_the_reference_on_exact_integers(monkeypatch):
    # The backward is the sparse encoders' (it reads only the codes): through the fused forward it must
    # give the reference's gradients, which integer data and float32 sums make exact.
    monkeypatch.setenv("SPARSEKIT_GPU_TOPK", "fused")
    gen = fresh_generator()
    x, W, b = integer_case(gen, 11, 7, 2 * tile_n(torch.float32) + 3, torch.float32)
    grad_out = on_device(torch.randint(-3, 4, (11, 4), generator=gen).float())[0]
    grads = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in (x, W, b)]
        values, indices = ops.topk_encode(*leaves, 4)
        grads[backend] = (indices, *torch.autograd.grad(values, leaves, grad_out))
    for got, want in zip(grads["triton"], grads["torch"]):
        assert torch.equal(got, want)


def test_kt_per_tile_keeps_overflowing_rows_rare_and_never_exceeds_what_is_exact():
    assert fused_topk.choose_kt(131072, 64, 128) == 3   # lam = 1/16, 1024 tiles: KT = 2 reruns ~4% of rows
    assert fused_topk.choose_kt(32768, 32, 128) == 3    # lam = 1/8, 256 tiles
    assert fused_topk.choose_kt(256, 256, 128) == 128   # lam = 128: capped by the tile (and k)
    gen = fresh_generator()
    for _ in range(200):
        n = int(torch.randint(1, 300000, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        bn = 2 ** int(torch.randint(4, 9, (1,), generator=gen))
        kt = fused_topk.choose_kt(n, k, bn)
        assert 1 <= kt <= min(k, bn)
        # Poisson tail: the chosen KT meets the 1% target and one less would not (unless capped).
        lam, tiles = k * bn / n, -(-n // bn)
        def poisson(j):
            return math.exp(j * math.log(lam) - lam - math.lgamma(j + 1))

        tail = 1.0 - sum(poisson(j) for j in range(kt + 1))
        assert kt == min(k, bn) or tiles * tail <= 0.01 + 1e-9
        if kt > 1:
            assert tiles * (tail + poisson(kt)) > 0.01 - 1e-9


def test_a_kt_below_one_is_refused_by_name():
    x, W, b = on_device(torch.ones(2, 3), torch.ones(3, 5), torch.zeros(5))
    with pytest.raises(ValueError, match="kt must be at least 1, got 0"):
        fused_topk.topk_encode_fused(x, W, b, 2, kt=0)


def distinct_tiles(dtype) -> list[dict]:
    """The GPU configs the launcher may choose for dtype, one per tile shape (BLOCK_M, BLOCK_N, BLOCK_K):
    warps and stages change the schedule, not the sums, and the interpreter ignores them."""
    seen = {}
    for tile in fused_topk.choosable_tiles(dtype):
        seen.setdefault((tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]), tile)
    return list(seen.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_every_config_the_launcher_can_choose_selects_exactly_the_reference_with_ties_and_reruns(dtype):
    # At each tile: B and n off its grid, d over two K steps, exact ties across columns, and rows whose
    # top k crowd one tile with kt=1 (reruns at 4 and then k candidates per tile, at the same tile).
    # Integers below 256: every sum and its bf16 rounding are exact, so every config must give the
    # reference's codes bit for bit. (Against the unfused path at these tiles: on a GPU, in
    # bench/gpu_fused_tune.py; its radix select is too slow for this under the interpreter.)
    gen = fresh_generator()
    tiles = distinct_tiles(dtype)
    assert len(tiles) >= (1 if dtype == torch.float32 else 12)
    for tile in tiles:
        bm, bn, bk = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
        batch, d, n, k = bm + 3, bk + 5, 5 * bn + 5, 5  # 6 tiles: kt=1 lists enough candidates to hold k
        x = torch.randint(-1, 2, (batch, d), generator=gen).float()   # |x @ W| <= d < 80
        W = torch.randint(-1, 2, (d, n), generator=gen).float()
        W[:, 1:8] = W[:, :1]             # columns 0-7 equal ...
        b = torch.randint(-5, 6, (n,), generator=gen).float()
        b[:8] = 100                      # ... and high: exact ties for the first places
        b[bn + 2: bn + 2 + 2 * k] += 60  # the rest of each row's top k: crowded into tile 1
        x, W, b = on_device(x.to(dtype), W.to(dtype), b.to(dtype))
        before = fused_topk.stats["overflow_rows"]
        got = fused_topk.topk_encode_fused(x, W, b, k, kt=1, tile=tile)
        assert fused_topk.stats["overflow_rows"] > before, tile
        assert_same_codes(got, reference.topk_encode(x, W, b, k), f"tile {tile}")


def test_a_tuned_entry_is_chosen_for_its_size_bucket_layout_and_precision_only(monkeypatch):
    tile = dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=4)
    monkeypatch.setattr(fused_topk, "INTERPRETING", False)  # choose as on a GPU (nothing launches here)
    key = fused_topk.tune_key(torch.bfloat16, 8192, 131072, 2048)
    assert key == ("bfloat16", "ieee", 3, 8192, 131072, 2048)
    monkeypatch.setattr(fused_topk, "TUNED", {key: tile})
    assert fused_topk.tile_config(torch.bfloat16, 6000, 100000, 1500) == tile      # same powers of two
    default = fused_topk.tile_config(torch.bfloat16, 8192, 131072, 4096)          # another K bucket
    assert default != tile and default["BLOCK_K"] == 64
    assert fused_topk.tile_config(torch.float16, 8192, 131072, 2048) != tile      # another dtype
    assert fused_topk.tile_config(torch.bfloat16, 8192, 131072, 2048, w_unit_stride=False) != tile  # layout
    assert tile in fused_topk.choosable_tiles(torch.bfloat16)
    assert tile not in fused_topk.choosable_tiles(torch.float32)


@pytest.mark.parametrize("tile, message", [
    (dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3), r"missing \['BLOCK_K'\]"),
    (dict(BLOCK_M=64, BLOCK_N=96, BLOCK_K=32, num_warps=4, num_stages=3), r"tile\['BLOCK_N'\] must be a power of two"),
    (dict(BLOCK_M=8, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3), "at least 16"),
    (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3, GROUP_M=4), r"unknown \['GROUP_M'\]"),
])
def test_a_malformed_tile_is_refused_naming_the_field(tile, message):
    x, W, b = on_device(torch.ones(2, 3), torch.ones(3, 5), torch.zeros(5))
    with pytest.raises(ValueError, match=message):
        fused_topk.topk_encode_fused(x, W, b, 2, tile=tile)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_packed_keys_select_what_the_round_by_round_epilogue_selects_with_ties_and_reruns(dtype, monkeypatch):
    # Packed keys (the column in the low bits a 16-bit value leaves zero) against the rounds that find
    # the column by a second reduction: exact ties across tiles, reruns (kt=1), real values, every sign.
    gen = fresh_generator()
    bn = tile_n(dtype)
    cases = []
    for batch, d, n, k in [(5, 7, 3 * bn + 4, 6), (tile_m(dtype) + 2, 9, 2 * bn + 1, 3)]:
        x, W, b = integer_case(gen, batch, d, n, dtype, duplicates=bn + 3)
        b = b.clone()
        b[: bn + 4] += 30  # the duplicated columns lead: more than kt of them per tile, tied
        cases.append((x, W, b, k))
        real = (torch.randn(batch, d, generator=gen), torch.randn(d, n, generator=gen) / d**0.5,
                torch.randn(n, generator=gen) - 2.0)  # mostly negative pre: the order keys' other half
        cases.append((*on_device(*(t.to(dtype) for t in real)), k))
    for x, W, b, k in cases:
        for kt in (1, None):
            monkeypatch.setenv("SPARSEKIT_GPU_TOPK_EPILOGUE", "rounds")
            rounds = fused_topk.topk_encode_fused(x, W, b, k, kt=kt)
            monkeypatch.delenv("SPARSEKIT_GPU_TOPK_EPILOGUE")
            assert fused_topk.packs(dtype)
            packed = fused_topk.topk_encode_fused(x, W, b, k, kt=kt)
            assert_same_codes(packed, rounds, f"n={W.shape[1]} k={k} kt={kt}")
            assert_same_codes(packed, unfused(x, W, b, k), f"unfused, n={W.shape[1]} k={k} kt={kt}")


def test_packed_keys_are_refused_for_float32_and_an_unknown_epilogue_by_name(monkeypatch):
    x, W = on_device(torch.zeros(2, 3), torch.zeros(3, 40))
    assert not fused_topk.packs(torch.float32)
    with pytest.raises(ValueError, match="pack"):
        fused_topk.launch(x, W, None, 1, False, fused_topk.tile_for(x, W), pack=True)
    monkeypatch.setenv("SPARSEKIT_GPU_TOPK_EPILOGUE", "fastest")
    with pytest.raises(RuntimeError, match="SPARSEKIT_GPU_TOPK_EPILOGUE"):
        fused_topk.packs(torch.bfloat16)
