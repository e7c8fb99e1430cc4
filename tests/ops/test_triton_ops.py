"""The Triton kernels compute what reference.py computes: every op, outputs and every gradient.

Without CUDA they run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports a kernel), so shapes stay small: the interpreter runs
each program as NumPy. On a GPU machine the same tests run the compiled kernels on CUDA tensors.
float64 is not a Triton dtype (ops route it to the reference), so the float32 cases are checked
against a float64 evaluation of the reference, as the C++ parity tests do for float32.
Fresh random cases on the Triton path are tests/ops/test_fuzz.py's (a few per op in `make test`,
1,000 per op in `make fuzz`).
"""
import os

import pytest
import torch
from helpers.op_cases import OPS, compare_backends, make_case, run

import sparsekit

SHAPES = [  # (batch, d_in, n, k): ragged sizes, k=1, k=n, one latent
    dict(batch=13, d_in=11, n=29, k=5),
    dict(batch=1, d_in=3, n=7, k=1),
    dict(batch=6, d_in=5, n=9, k=9),
    dict(batch=3, d_in=1, n=1, k=1),
]
# Several GEMM tiles on every axis (interpreter tiles: 16 x 32, K by 16) and several selection blocks.
MULTI_BLOCK = dict(batch=19, d_in=21, n=70, k=9)


@pytest.fixture(autouse=True)
def triton_runs_on_the_gpu_when_there_is_one(monkeypatch):
    """With CUDA, each op called on the triton backend moves its tensors to the GPU and its outputs
    back (both differentiable), so the shared CPU cases and comparisons run the compiled kernels."""
    if not torch.cuda.is_available():
        return

    def through_cuda(fn):
        def wrapped(*args, **kwargs):
            if os.environ.get("SPARSEKIT_BACKEND") != "triton":
                return fn(*args, **kwargs)
            move = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
            out = fn(*map(move, args), **{name: move(v) for name, v in kwargs.items()})
            if isinstance(out, tuple):
                return type(out)(*(o.cpu() for o in out))
            return out.cpu()
        return wrapped

    for op in OPS:
        monkeypatch.setattr(sparsekit.ops, op, through_cuda(getattr(sparsekit.ops, op)))


def compare(case, monkeypatch):
    compare_backends(case, monkeypatch, backend="triton")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{batch}-d{d_in}-n{n}-k{k}".format(**s))
@pytest.mark.parametrize("op", OPS)
def test_triton_matches_reference_on_real_values_with_gaps(op, shape, monkeypatch):
    compare(make_case(op, seed=11, **shape), monkeypatch)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "B{batch}-d{d_in}-n{n}-k{k}".format(**s))
@pytest.mark.parametrize("op", OPS)
def test_triton_matches_reference_on_exact_integers_with_ties(op, shape, monkeypatch):
    compare(make_case(op, seed=12, integer=True, **shape), monkeypatch)


@pytest.mark.parametrize("op", ["topk_encode", "batchtopk_encode", "sparse_decode", "sparse_decode_coo"])
def test_triton_matches_reference_across_many_blocks(op, monkeypatch):
    compare(make_case(op, seed=13, integer=op.endswith("encode"), **MULTI_BLOCK), monkeypatch)


@pytest.mark.parametrize("op", ["topk_encode", "relu_encode", "jumprelu_encode", "sparse_decode"])
def test_triton_matches_reference_on_non_contiguous_inputs(op, monkeypatch):
    compare(make_case(op, seed=14, noncontiguous=True), monkeypatch)


@pytest.mark.parametrize("op", ["sparse_decode", "sparse_decode_coo", "ghost_grad_loss"])
def test_triton_matches_reference_when_decoder_width_differs(op, monkeypatch):
    compare(make_case(op, seed=15, d_in=6, d_out=10), monkeypatch)


@pytest.mark.parametrize("op, frozen", [("sparse_decode", "W_dec"), ("sparse_decode", "values"),
                                        ("topk_encode", "x"), ("batchtopk_encode", "W_enc"),
                                        ("relu_encode", "W_enc"), ("jumprelu_encode", "log_threshold"),
                                        ("ghost_grad_loss", "x")])
def test_triton_matches_reference_when_only_some_inputs_need_gradients(op, frozen, monkeypatch):
    case = make_case(op, seed=16)
    case.fixed[frozen] = case.leaves.pop(frozen)
    compare(case, monkeypatch)


@pytest.mark.parametrize("op", ["topk_encode", "batchtopk_encode", "sparse_decode", "sparse_decode_coo"])
def test_triton_atomic_gradients_match_reference(op, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_DETERMINISTIC", "0")
    compare(make_case(op, seed=17, batch=9, d_in=7, n=12, k=4), monkeypatch)


def test_triton_topk_ties_go_to_the_lower_index(monkeypatch):
    # Duplicated encoder columns give exactly equal pre-activations: the lower index must win,
    # and the values must come out in descending order with ties in index order. The entries are
    # multiples of 1/8 in [-2, 2], so every partial sum is exact in float32: the ties (and values)
    # then hold in any summation order. With Gaussian entries they did not under the interpreter
    # on an AVX2 CPU, whose NumPy matmul (tl.dot there) sums some columns of a tile in another
    # order than others: duplicated columns came out one ulp apart.
    gen = torch.Generator().manual_seed(18)
    base = torch.randint(-16, 17, (6, 5), generator=gen).float() / 8
    W_enc = torch.cat([base, base, base[:, :3]], dim=1)          # columns j, j+5, j+10 tie
    b_enc = torch.zeros(13)
    x = torch.randint(-16, 17, (8, 6), generator=gen).float() / 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.to(device) for t in (x, W_enc, b_enc)]
    for k in (1, 4, 7, 13):
        monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
        values, indices = sparsekit.topk_encode(*args, k)
        monkeypatch.setenv("SPARSEKIT_BACKEND", "torch")
        ref_values, ref_indices = sparsekit.topk_encode(*args, k)
        assert torch.equal(indices, ref_indices), k
        same_values(values, ref_values, k)
        batch_codes = sparsekit.batchtopk_encode(*args, k)
        monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
        triton_codes = sparsekit.batchtopk_encode(*args, k)
        for got, expected in zip(triton_codes, batch_codes):
            if got.is_floating_point():
                same_values(got, expected, k)
            else:
                assert torch.equal(got, expected), k


def same_values(got, expected, k):
    """Bitwise under the interpreter (one float32 evaluation order); on a GPU the compiled GEMM and
    cuBLAS round differently (FMA, summation order), so the pre-activations agree to rounding there:
    the selection (indices, checked exactly) is what the ties decide."""
    if got.is_cuda:
        torch.testing.assert_close(got, expected, msg=lambda m: f"k={k}: {m}")
    else:
        assert torch.equal(got, expected), k


def test_triton_topk_selects_on_gaps_of_one_ulp(monkeypatch):
    # Radix selection compares the float bits: values one ulp apart, and -0.0 against +0.0 (equal,
    # so the lower index wins), must order exactly as torch.sort orders them.
    from sparsekit.kernels.select import topk_rows
    one = torch.tensor(1.0)
    row = torch.stack([one, torch.nextafter(one, torch.tensor(2.0)), torch.nextafter(one, torch.tensor(0.0)),
                       torch.tensor(-0.0), torch.tensor(0.0), -one, torch.tensor(-1e-30), torch.tensor(1e-30)])
    pre = torch.stack([row, row.flip(0)])
    if torch.cuda.is_available():
        pre = pre.cuda()
    for k in range(1, 9):
        values, indices = topk_rows(pre, k)
        expected = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(indices, expected), k
        assert torch.equal(values, torch.relu(pre.gather(1, expected))), k


def _decode_grads(case, monkeypatch):
    _, grads = run(case, "triton", monkeypatch)
    return grads


def test_triton_deterministic_decoder_gradient_is_repeatable_and_sums_in_order(monkeypatch):
    # Duplicate latents in a batch (COO codes), many entries per latent: the deterministic grad
    # W_dec must be bitwise repeatable and, under the interpreter, equal to summing each latent's
    # entries one by one in float32, in the order they appear.
    monkeypatch.setenv("SPARSEKIT_DETERMINISTIC", "1")
    case = make_case("sparse_decode_coo", seed=19, batch=24, d_in=9, n=5, k=6)
    first = _decode_grads(case, monkeypatch)
    second = _decode_grads(case, monkeypatch)
    for name in first:
        assert torch.equal(first[name], second[name]), name

    values, rows, cols = case.leaves["values"], case.fixed["rows"], case.fixed["cols"]
    gen = torch.Generator().manual_seed(1234)  # op_cases.run's output weights: grad_y
    grad_y = torch.randn(case.fixed["batch_size"], case.leaves["W_dec"].shape[1], generator=gen)
    expected = torch.zeros_like(case.leaves["W_dec"])
    for e in range(values.shape[0]):
        expected[cols[e]] = expected[cols[e]] + values[e] * grad_y[rows[e]]
    if torch.cuda.is_available():  # compiled kernels may fuse the multiply-add: equal up to rounding
        torch.testing.assert_close(first["W_dec"], expected)
    else:
        assert torch.equal(first["W_dec"], expected)


def test_triton_deterministic_encoder_gradients_are_repeatable(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_DETERMINISTIC", "1")
    for op in ("topk_encode", "batchtopk_encode"):
        case = make_case(op, seed=20, batch=16, d_in=8, n=6, k=3)
        first, second = _decode_grads(case, monkeypatch), _decode_grads(case, monkeypatch)
        for name in first:
            assert torch.equal(first[name], second[name]), (op, name)


def test_triton_ops_run_through_their_custom_ops(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: the interpreter
    x = torch.randn(4, 3, device=device, requires_grad=True)
    values, _ = sparsekit.topk_encode(x, torch.randn(3, 6, device=device), torch.randn(6, device=device), 2)
    assert "topk_encode_triton" in type(values.grad_fn).__name__
    y = sparsekit.sparse_decode(values, torch.tensor([[0, 1]] * 4, device=device),
                                torch.randn(6, 3, device=device), torch.zeros(3, device=device))
    assert "sparse_decode_triton" in type(y.grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_takes_16_bit_inputs_and_accumulates_in_float32(dtype, monkeypatch):
    # Small integers are exact in 16 bits and so are their products' sums here (|pre| <= 66): the
    # encoders must select and return exactly what float32 does. Decoding sums random 16-bit
    # values in float32 and rounds once: within a 16-bit rounding of the float32 result.
    gen = torch.Generator().manual_seed(21)
    B, d, n, k = 9, 7, 20, 4
    x, W, b = (torch.randint(-3, 4, s, generator=gen).to(dtype) for s in ((B, d), (d, n), (n,)))
    W_dec, b_dec = torch.randn(n, d, generator=gen).to(dtype), torch.randn(d, generator=gen).to(dtype)
    grad_y = torch.randn(B, d, generator=gen).to(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: the interpreter
    x, W, b, W_dec, b_dec, grad_y = (t.to(device) for t in (x, W, b, W_dec, b_dec, grad_y))
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    values, indices = sparsekit.topk_encode(x, W, b, k)
    batch_codes = sparsekit.batchtopk_encode(x, W, b, k)
    dense = sparsekit.relu_encode(x, W, b)
    leaves = [values.detach().requires_grad_(), W_dec.detach().requires_grad_()]
    y = sparsekit.sparse_decode(leaves[0], indices, leaves[1], b_dec)
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert values.dtype == y.dtype == dtype
    monkeypatch.setenv("SPARSEKIT_BACKEND", "torch")
    f32 = [t.float() for t in (x, W, b)]
    ref_values, ref_indices = sparsekit.topk_encode(*f32, k)
    assert torch.equal(indices, ref_indices) and torch.equal(values.float(), ref_values)
    for got, expected in zip(batch_codes, sparsekit.batchtopk_encode(*f32, k)):
        assert torch.equal(got.float() if got.is_floating_point() else got, expected)
    assert torch.equal(dense.float(), sparsekit.relu_encode(*f32))
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref_y = sparsekit.sparse_decode(ref_leaves[0], indices, ref_leaves[1], b_dec.float())
    ref_grads = torch.autograd.grad(ref_y, ref_leaves, grad_y.float())
    eps = torch.finfo(dtype).eps
    for got, expected in zip((y.detach(), *grads), (ref_y.detach(), *ref_grads)):
        torch.testing.assert_close(got.float(), expected, rtol=eps, atol=eps * float(expected.abs().max()))


@pytest.mark.parametrize("chunk", [None, 4, 7])
def test_triton_segment_sums_split_a_hot_latent_into_chunks_added_in_order(chunk, monkeypatch):
    # A latent firing on most rows (61 entries) beside latents with 0, 1 and 3 entries, and rows
    # holding inf that only another latent names. A segment longer than a chunk is summed chunk by
    # chunk by separate programs (load balance), each chunk's entries one by one in order, then the
    # chunks' sums in order: bit for bit that float32 sum under the interpreter, weights likewise,
    # and no slot past a segment's or chunk's end may read a row (0 * inf would leave a NaN).
    from sparsekit.kernels import sparse

    if chunk is not None:
        monkeypatch.setattr(sparse, "CHUNK_MIN", chunk)
    gen = torch.Generator().manual_seed(5)
    batch, width = 64, 7
    cols = torch.tensor([0] * 61 + [2, 3, 3, 3])
    rows = torch.cat([torch.arange(61), torch.tensor([61, 62, 63, 62])])
    values = torch.randn(cols.shape[0], generator=gen)
    dense = torch.randn(batch, width, generator=gen)
    dense[62:, 1] = float("inf")  # only latent 3 reads rows 62 and 63
    size = sparse.chunk_entries(cols.shape[0], width)
    assert size == (chunk or sparse.CHUNK_MIN)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out, sums = sparse.coo_t_times_dense(values.to(device), rows.to(device), cols.to(device), dense.to(device), 5,
                                         False)
    expected, expected_sums = torch.zeros(5, width), torch.zeros(5)
    for latent in range(5):
        entries = (cols == latent).nonzero().flatten().tolist()
        pieces = [entries[i:i + size] for i in range(0, len(entries), size)] if len(entries) > size else [entries]
        for piece in pieces:
            part, part_sum = torch.zeros(width), torch.zeros(())
            for e in piece:
                part = part + values[e] * dense[rows[e]]
                part_sum = part_sum + values[e]
            expected[latent] = expected[latent] + part
            expected_sums[latent] = expected_sums[latent] + part_sum
    assert not torch.isnan(out[[0, 1, 2, 4]]).any()
    if device == "cuda":  # compiled kernels may fuse the multiply-add
        torch.testing.assert_close(out.cpu(), expected)
    else:
        assert torch.equal(out, expected) and torch.equal(sums, expected_sums)


def test_the_chunk_plan_lists_each_long_segments_chunks_once_in_order():
    from sparsekit.kernels import sparse

    counts = torch.tensor([0, 9, 3, 4, 12, 5])
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    slots = sparse._chunk_slots(int(counts.sum()), 4)
    start, end, seg, count = sparse.chunk_plan(ptr, 4, slots)
    used = end > start
    # segments 1 (9 entries), 4 (12) and 5 (5) are longer than 4: 3 + 3 + 2 chunks, in order
    assert seg[used].tolist() == [1, 1, 1, 4, 4, 4, 5, 5]
    assert (end - start)[used].tolist() == [4, 4, 1, 4, 4, 4, 4, 1]
    assert start[used].tolist() == [0, 4, 8, 16, 20, 24, 28, 32]
    assert count.tolist()[:8] == [3, 0, 0, 3, 0, 0, 2, 0] and not count[8:].any() and not used[8:].any()
    # the bound on slots holds for any lengths: every long segment's chunks fit
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        counts = torch.randint(0, 40, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen)
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        for chunk in (1, 2, 3, 8):
            need = int(torch.where(counts > chunk, (counts + chunk - 1) // chunk, 0).sum())
            assert need <= sparse._chunk_slots(int(counts.sum()), chunk)


def test_chunks_grow_with_entries_times_width_to_bound_the_partial_sums():
    from sparsekit.kernels import sparse

    assert sparse.chunk_entries(4096 * 32, 768) == sparse.CHUNK_MIN
    for entries, width in ((16384 * 128, 4096), (8192 * 64, 2048), (10**7, 8192)):
        chunk = sparse.chunk_entries(entries, width)
        assert sparse._chunk_slots(entries, chunk) * width * 4 <= sparse.PARTIALS_BYTES
        assert chunk == sparse.CHUNK_MIN or sparse._chunk_slots(entries, chunk // 2) * width * 4 > sparse.PARTIALS_BYTES


@pytest.mark.parametrize("chunk", [None, 3])
def test_triton_decode_backward_pass_by_latent_gives_grad_w_dec_in_order_and_every_entrys_dot(chunk, monkeypatch):
    # segment_sums_and_dots: grad W_dec summed as coo_t_times_dense sums it (bit for bit under the
    # interpreter; chunked where a latent is long), and each entry's grad value grad_y[row] . W_dec[col]
    # at its own position (slots past a segment's end write elsewhere): odd segment lengths, an empty
    # latent, a hot latent (split into chunks when chunk = 3), a width off the block size.
    from sparsekit.kernels import sparse

    if chunk is not None:
        monkeypatch.setattr(sparse, "CHUNK_MIN", chunk)
    gen = torch.Generator().manual_seed(8)
    batch, width, n = 20, 37, 6
    cols = torch.tensor([5, 0, 0, 3, 0, 2, 0, 5, 0, 3, 0, 0, 2, 0, 0])
    rows = torch.randint(0, batch, (cols.shape[0],), generator=gen)
    values = torch.randn(cols.shape[0], generator=gen)
    grad_y = torch.randn(batch, width, generator=gen)
    W_dec = torch.randn(n, width, generator=gen)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    move = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    grad_W, dots = sparse.segment_sums_and_dots(*move(values, rows, cols, grad_y, W_dec))
    expected_W, _ = sparse.coo_t_times_dense(*move(values, rows, cols, grad_y), n, False)
    expected_dots = (grad_y[rows].double() * W_dec[cols].double()).sum(1)
    torch.testing.assert_close(dots.cpu().double(), expected_dots, rtol=1e-5, atol=1e-5)
    if device == "cuda":
        torch.testing.assert_close(grad_W, expected_W)
    else:
        assert torch.equal(grad_W, expected_W) and not grad_W[[1, 4]].any()
    assert sparse.chunk_entries(cols.shape[0], width) == (chunk or sparse.CHUNK_MIN)  # chunk 3: latent 0 split


def test_triton_ghost_grads_pad_a_ragged_dead_count_and_give_the_references_loss_and_gradients(monkeypatch):
    # |D| = 37 dead latents: every GEMM of the ghost term must run on operands padded to a multiple of
    # 64 dead columns (aligned leading strides), and the loss and every gradient must stay the
    # reference's (the padding adds exact zeros).
    from sparsekit.kernels import ghost

    shapes = []
    real_gemm = ghost.gemm

    def spy(a, b, *args, **kwargs):
        shapes.append((tuple(a.shape), tuple(b.shape), a.stride(), b.stride()))
        return real_gemm(a, b, *args, **kwargs)

    monkeypatch.setattr(ghost, "gemm", spy)
    gen = torch.Generator().manual_seed(12)
    B, d, n = 16, 32, 96
    x = torch.randn(B, d, generator=gen)
    W_enc, b_enc = torch.randn(d, n, generator=gen) * 0.2, torch.randn(n, generator=gen) * 0.1
    W_dec = torch.randn(n, d, generator=gen) * 0.2
    dead = torch.randperm(n, generator=gen)[:37]
    residual, mse = torch.randn(B, d, generator=gen), torch.tensor(0.7)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for name in ("triton", "torch"):
        monkeypatch.setenv("SPARSEKIT_BACKEND", name)
        leaves = [t.clone().to(device).requires_grad_() for t in (x, W_enc, b_enc)]
        loss = sparsekit.ops.ghost_grad_loss(*leaves, W_dec.to(device), dead.to(device), residual.to(device),
                                             mse.to(device))
        loss.backward()
        results[name] = [loss.detach()] + [t.grad for t in leaves]
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(shapes) == 5  # exp(pre), ghost; grad pre, grad x, grad W_enc
    for a_shape, b_shape, a_stride, b_stride in shapes:
        assert 64 in (a_shape[1], b_shape[1]), (a_shape, b_shape)  # the 37 dead columns as 64, as K or as N
        assert all(s % 16 == 0 or s == 1 for s in a_stride + b_stride), (a_stride, b_stride)
