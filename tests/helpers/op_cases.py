"""Random inputs for every op and a runner that returns outputs and gradients on one backend.

Two kinds of data, as docs/design.md's "Testing parity" asks:
- integer-valued (exact): small integers make every GEMM exact on every backend, so selection
  must agree exactly, exact ties included (they are frequent: lower index wins);
- real-valued with enforced gaps: rows are redrawn until the k-th and (k+1)-th pre-activations
  (and every kept value and ReLU/JumpReLU kink) are at least `gap` apart, so no backend's rounding
  can flip a selection.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import sparsekit
from sparsekit.ops import reference

OPS = ("topk_encode", "batchtopk_encode", "relu_encode", "jumprelu_encode", "sparse_decode",
       "sparse_decode_coo", "ghost_grad_loss")
ENCODERS = ("topk_encode", "batchtopk_encode", "relu_encode", "jumprelu_encode")
JUMPRELU_BANDWIDTH = 0.05          # real-valued cases
JUMPRELU_BANDWIDTH_INTEGER = 1.5   # integer cases: the window holds pre-activations 1, 2, 3


@dataclasses.dataclass
class Case:
    op: str
    leaves: dict          # name -> float tensor that receives a gradient
    fixed: dict           # name -> anything else passed as is (k, indices, ...)
    views: dict = dataclasses.field(default_factory=dict)  # name -> leaf -> argument (e.g. a transpose)
    description: str = ""

    def arguments(self, leaves: dict) -> dict:
        args = {name: self.views.get(name, lambda t: t)(t) for name, t in leaves.items()}
        args.update(self.fixed)
        return args


def _kinks(pre: torch.Tensor, op: str, k: int, log_threshold) -> torch.Tensor:
    """Per row, the smallest distance from a value to a decision boundary of the op."""
    if op == "topk_encode":
        top = torch.sort(pre, dim=-1, descending=True).values
        gaps = [(top[:, k - 1] - top[:, k]).abs()] if k < pre.shape[1] else []
        return torch.stack(gaps + [top[:, :k].abs().min(-1).values]).min(0).values
    if op == "batchtopk_encode":
        return pre.abs().min(-1).values  # plus the global gap, checked by the caller
    if op == "relu_encode":
        return pre.abs().min(-1).values
    if op == "jumprelu_encode":  # the threshold and both edges of the gradient window
        dist = (pre - torch.exp(log_threshold)).abs()
        return torch.minimum(dist, (dist - JUMPRELU_BANDWIDTH / 2).abs()).min(-1).values
    raise ValueError(op)


def _rows_at_global_boundary(pre: torch.Tensor, m: int, gap: float) -> torch.Tensor:
    """Rows holding the m-th or (m+1)-th largest relu(pre) when those two are closer than gap."""
    flat = torch.relu(pre).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    bad = torch.zeros(pre.shape[0], dtype=torch.bool)
    if m < flat.numel() and flat[order[m - 1]] > 0 and flat[order[m - 1]] - flat[order[m]] < gap:
        bad[order[m - 1] // pre.shape[1]] = bad[order[m] // pre.shape[1]] = True
    return bad


def make_encoder_inputs(op: str, gen: torch.Generator, dtype, batch: int, d_in: int, n: int, k: int,
                        integer: bool, gap: float = 1e-4):
    """x [B, d_in], W_enc [d_in, n], b_enc [n] (and log_threshold [n] for JumpReLU)."""
    def draw(*shape, low=-3, high=4, scale=1.0):
        if integer:
            return torch.randint(low, high, shape, generator=gen).to(dtype)
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    W_enc = draw(d_in, n, scale=d_in ** -0.5)
    b_enc = draw(n, low=-5, high=6, scale=0.5)
    if integer:  # thresholds 1.5, 2.5, 3.5: never within 0.5 of an integer pre-activation
        log_threshold = torch.log(torch.randint(1, 4, (n,), generator=gen).to(dtype) + 0.5)
    else:
        log_threshold = torch.randn(n, generator=gen, dtype=dtype) * 0.3 - 1.0
    x = draw(batch, d_in)
    if not integer:
        for _ in range(200):
            pre = (x.double() @ W_enc.double() + b_enc.double())
            bad = _kinks(pre, op, k, log_threshold.double()) < gap
            if op == "batchtopk_encode":
                bad |= _rows_at_global_boundary(pre, batch * k, gap)
            if not bad.any():
                break
            x[bad] = draw(int(bad.sum()), d_in)
        else:
            raise RuntimeError("could not draw inputs with enforced gaps; use a larger shape or seed")
    return x, W_enc, b_enc, log_threshold


GHOST_MAX_CANCELLATION = 20.0


def _ghost_cancellation(x, W_enc, b_enc, W_dec, dead_idx) -> torch.Tensor:
    """Per row, ||exp(pre_D) @ |W_dec[D]| || / ||exp(pre_D) @ W_dec[D]||: how much the ghost
    reconstruction g cancels (1: not at all)."""
    exp_pre = torch.exp(x.double() @ W_enc.double()[:, dead_idx] + b_enc.double()[dead_idx])
    V = W_dec.double()[dead_idx]
    return (exp_pre @ V.abs()).norm(dim=-1) / (exp_pre @ V).norm(dim=-1)


def _condition_ghost_rows(x, W_enc, b_enc, fixed: dict, gen: torch.Generator) -> None:
    """Redraw (in place) the rows of x whose ghost reconstruction g cancels more than
    GHOST_MAX_CANCELLATION-fold, and W_dec when that does not help: ghost grads rescale each row by
    the detached ||r|| / (2 ||g||), which carries g's rounding error, amplified by the cancellation,
    into every gradient of the row. In float32 a 1000-fold cancellation leaves ~1e-5 relative
    error in any implementation (fuzz seed 1111491243 on Triton), so float32 cases keep g
    well-conditioned, as real-valued cases keep selection gaps; float64 cases keep every draw."""
    for attempt in range(200):
        bad = _ghost_cancellation(x, W_enc, b_enc, fixed["W_dec"], fixed["dead_idx"]) > GHOST_MAX_CANCELLATION
        if not bad.any():
            return
        if attempt % 20 == 19:
            fixed["W_dec"] = torch.randn(fixed["W_dec"].shape, generator=gen, dtype=x.dtype)
        else:
            x[bad] = torch.randn(int(bad.sum()), x.shape[1], generator=gen, dtype=x.dtype) * 0.5
    raise RuntimeError("could not draw a well-conditioned ghost reconstruction; use another seed")


def make_case(op: str, seed: int, dtype=torch.float32, batch: int = 13, d_in: int = 11, n: int = 29,
              k: int = 5, d_out: int | None = None, integer: bool = False, noncontiguous: bool = False,
              n_dead: int = 4) -> Case:
    gen = torch.Generator().manual_seed(seed)
    d_out = d_in if d_out is None else d_out
    desc = (f"{op} seed={seed} dtype={dtype} B={batch} d_in={d_in} n={n} k={k} d_out={d_out} "
            f"integer={integer} noncontiguous={noncontiguous}")
    views = {}
    if op in ENCODERS:
        x, W_enc, b_enc, log_threshold = make_encoder_inputs(op, gen, dtype, batch, d_in, n, k, integer)
        leaves = {"x": x, "W_enc": W_enc, "b_enc": b_enc}
        fixed = {}
        if op in ("topk_encode", "batchtopk_encode"):
            fixed["k"] = k
        if op == "jumprelu_encode":
            leaves["log_threshold"] = log_threshold
            fixed["bandwidth"] = JUMPRELU_BANDWIDTH_INTEGER if integer else JUMPRELU_BANDWIDTH
        if noncontiguous:
            leaves["x"] = x.t().contiguous()          # stored [d_in, B]; passed as a transpose
            views["x"] = lambda t: t.t()
            leaves["W_enc"] = torch.stack([W_enc, W_enc], -1).reshape(d_in, 2 * n)
            views["W_enc"] = lambda t: t[:, ::2]       # every other column: a strided view
        return Case(op, leaves, fixed, views, desc)

    def floats(*shape):
        if integer:
            return torch.randint(-3, 4, shape, generator=gen).to(dtype)
        return torch.randn(*shape, generator=gen, dtype=dtype)

    W_dec, b_dec = floats(n, d_out), floats(d_out)
    if op == "sparse_decode":
        values = floats(batch, k)
        indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)])
        leaves = {"values": values, "W_dec": W_dec, "b_dec": b_dec}
        fixed = {"indices": indices}
        if noncontiguous:
            leaves["values"] = values.t().contiguous()
            views["values"] = lambda t: t.t()
        return Case(op, leaves, fixed, views, desc)
    if op == "sparse_decode_coo":
        n_entries = batch * k
        leaves = {"values": floats(n_entries), "W_dec": W_dec, "b_dec": b_dec}
        fixed = {"rows": torch.randint(0, batch, (n_entries,), generator=gen),
                 "cols": torch.randint(0, n, (n_entries,), generator=gen), "batch_size": batch}
        return Case(op, leaves, fixed, views, desc)
    if op == "ghost_grad_loss":
        x = torch.randn(batch, d_in, generator=gen, dtype=dtype) * 0.5
        W_enc = torch.randn(d_in, n, generator=gen, dtype=dtype) * d_in ** -0.5
        b_enc = torch.randn(n, generator=gen, dtype=dtype) * 0.5 - 1
        leaves = {"x": x, "W_enc": W_enc, "b_enc": b_enc}
        fixed = {"W_dec": torch.randn(n, d_out, generator=gen, dtype=dtype),
                 "dead_idx": torch.randperm(n, generator=gen)[:min(n_dead, n)],
                 "residual": torch.randn(batch, d_out, generator=gen, dtype=dtype),
                 "mse_main": torch.tensor(1.7, dtype=dtype)}
        if dtype != torch.float64:
            _condition_ghost_rows(x, W_enc, b_enc, fixed, gen)
        return Case(op, leaves, fixed, views, desc)
    raise ValueError(op)


# Leaves scaled together so that every pre-activation (and decoded value) is scaled by the same
# power of two: floating point is exactly equivariant under such scalings, so the selections (and
# the gaps enforced at scale 1) survive, while the kernels meet huge or tiny magnitudes.
def scale_magnitudes(case: Case, a: int, b: int) -> Case:
    """x (or values) times 2**a, W_enc (or W_dec) times 2**b, biases times 2**(a + b); JumpReLU's
    threshold and bandwidth move with them. ghost_grad_loss (exp of the pre-activations) scales its
    residual by 2**a and W_dec by 2**b instead."""
    leaves, fixed = dict(case.leaves), dict(case.fixed)
    two = lambda e: 2.0 ** e
    if case.op in ENCODERS:
        leaves["x"], leaves["W_enc"], leaves["b_enc"] = (leaves["x"] * two(a), leaves["W_enc"] * two(b),
                                                         leaves["b_enc"] * two(a + b))
        if "log_threshold" in leaves:
            leaves["log_threshold"] = leaves["log_threshold"] + (a + b) * math.log(2.0)
            fixed["bandwidth"] = fixed["bandwidth"] * two(a + b)
    elif case.op in ("sparse_decode", "sparse_decode_coo"):
        leaves["values"], leaves["W_dec"], leaves["b_dec"] = (leaves["values"] * two(a), leaves["W_dec"] * two(b),
                                                              leaves["b_dec"] * two(a + b))
    elif case.op == "ghost_grad_loss":
        fixed["residual"], fixed["W_dec"] = fixed["residual"] * two(a), fixed["W_dec"] * two(b)
        fixed["mse_main"] = fixed["mse_main"] * two(2 * a)
    return dataclasses.replace(case, leaves=leaves, fixed=fixed, description=f"{case.description} scale=2^({a},{b})")


LAYOUTS = ("contiguous", "transposed", "strided", "offset")


def _stored_and_view(t: torch.Tensor, layout: str):
    """(tensor to store, function of it giving a view equal to t with the requested layout)."""
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous(), lambda s: s.t()
    if layout == "strided":  # every other element of the last dimension
        return torch.stack([t, t], -1).reshape(*t.shape[:-1], 2 * t.shape[-1]), lambda s: s[..., ::2]
    if layout == "offset":  # contiguous, but starting one row (or element) into its storage
        return torch.cat([t[:1], t]), lambda s: s[1:]
    return t, lambda s: s


def with_layouts(case: Case, layouts: dict) -> Case:
    """Each named tensor of the case (a leaf or a fixed tensor) passed with the given layout: a
    leaf as a view of a larger stored tensor (its gradient is compared on the stored tensor), a
    fixed tensor as an equal view."""
    leaves, fixed, views = dict(case.leaves), dict(case.fixed), dict(case.views)
    for name, layout in layouts.items():
        if name in leaves and name not in views:
            leaves[name], views[name] = _stored_and_view(leaves[name], layout)
        elif isinstance(fixed.get(name), torch.Tensor) and fixed[name].dim() >= 1 and fixed[name].numel():
            stored, view = _stored_and_view(fixed[name], layout)
            fixed[name] = view(stored)
    shown = ",".join(f"{n}:{l}" for n, l in layouts.items() if l != "contiguous")
    return dataclasses.replace(case, leaves=leaves, fixed=fixed, views=views,
                               description=f"{case.description} layouts={shown or 'contiguous'}")


def run(case: Case, backend: str, monkeypatch, out_weights_seed: int = 1234):
    """Forward and backward of case.op on a forced backend.

    Returns (outputs: tuple of tensors, grads: dict name -> gradient of the leaf), on the CPU. The
    loss is a fixed random weighting of every float output, the same for every backend. Triton runs
    on the GPU where there is one (inputs moved there: views become contiguous copies), else under
    its interpreter on the CPU tensors themselves.
    """
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    leaves = {name: t.detach().to(device).clone().requires_grad_() for name, t in case.leaves.items()}
    arguments = {name: v.to(device) if isinstance(v, torch.Tensor) else v
                 for name, v in case.arguments(leaves).items()}
    outputs = getattr(sparsekit.ops, case.op)(**arguments)
    outputs = tuple(o.cpu() for o in (outputs if isinstance(outputs, tuple) else (outputs,)))
    gen = torch.Generator().manual_seed(out_weights_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
               for o in outputs if o.is_floating_point())
    names = [n for n, t in leaves.items()]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return tuple(o.detach() for o in outputs), {n: g if g is None else g.cpu() for n, g in zip(names, grads)}


def tolerance(dtype) -> float:
    return 1e-11 if dtype == torch.float64 else 2e-5


def _compared_exactly(actual, expected, what: str) -> bool:
    """Missing gradients and integer outputs must match exactly; True when that settled it."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one gradient is missing"
        return True
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: integer outputs differ"
        return True
    return False


def assert_close_scaled(actual, expected, dtype, what: str, magnitude=None) -> None:
    """assert_close with an absolute tolerance scaled to the size of the expected values, or of the
    terms summed (``magnitude``: the same op on |inputs|) where that is larger: terms that cancel to
    an exact 0 in one summation order leave a rounding error of their own size in another (an FMA)."""
    if _compared_exactly(actual, expected, what):
        return
    tol = tolerance(dtype)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if magnitude is not None and magnitude.numel():
        scale = max(scale, float(magnitude.abs().max()))
    # Relative to the largest expected value only (no absolute floor), so tiny magnitudes are checked too.
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def in_float64(case: Case, absolute: bool = False) -> Case:
    """The same case with every floating tensor promoted to float64 (and made non-negative)."""
    def promote(v):
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            return v
        return v.double().abs() if absolute else v.double()
    return dataclasses.replace(case, leaves={n: promote(t) for n, t in case.leaves.items()},
                               fixed={n: promote(v) for n, v in case.fixed.items()})


def _assert_as_accurate_as_reference(actual, expected, exact, magnitude, what: str) -> None:
    """float32: the backend's error against a float64 evaluation must be within a small multiple
    of the float32 reference's own error, or of float32 rounding on the magnitude of the terms
    summed (the same op on |inputs|): rounding is allowed, a wrong result is not. Integer outputs
    (selected indices) must equal the float32 reference's or the float64 evaluation's: kept values
    closer than float32 rounding may come out in either order (the selection itself is protected
    by the cases' enforced gaps)."""
    if expected is not None and actual is not None and not expected.is_floating_point():
        assert torch.equal(actual, expected) or torch.equal(actual, exact), f"{what}: integer outputs differ"
        return
    if _compared_exactly(actual, expected, what):
        return
    exact = exact.to(actual.dtype).double()
    error = float((actual.double() - exact).norm())
    reference_error = float((expected.double() - exact).norm())
    bound = max(4 * reference_error, 1e-5 * max(float(magnitude.norm()), float(exact.norm())), 1e-30)
    assert error <= bound, f"{what}: error {error:.3g} vs float64, reference float32 error {reference_error:.3g}"


def _same_selection_up_to_near_ties(indices, expected_indices, expected_values) -> bool:
    """float32 top-k: per row the same kept indices, in the reference's order except among kept
    values within float32 rounding of each other (a backend's own summation order may round two
    values a few ulp apart the other way, or to a tie that then goes to the lower index)."""
    if not torch.equal(indices.sort(dim=-1).values, expected_indices.sort(dim=-1).values):
        return False
    for row in (indices != expected_indices).any(dim=-1).nonzero().flatten():
        differ = indices[row] != expected_indices[row]
        values = expected_values[row][differ].double()
        if float(values.max() - values.min()) > 1e-6 * max(float(values.abs().max()), 1e-30):
            return False
    return True


def compare_backends(case: Case, monkeypatch, backend: str = "cpp") -> None:
    """case.op on `backend` must match the reference: outputs and every gradient."""
    dtype = next(iter(case.leaves.values())).dtype
    out_ref, grads_ref = run(case, "torch", monkeypatch)
    out, grads = run(case, backend, monkeypatch)
    assert len(out) == len(out_ref)
    for i, (a, e) in enumerate(zip(out, out_ref)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{case.description}: output {i} {a.shape} {a.dtype}"
    if dtype == torch.float64:
        out_abs, grads_abs = run(in_float64(case, absolute=True), "torch", monkeypatch)
        for i, (a, e, m) in enumerate(zip(out, out_ref, out_abs)):
            assert_close_scaled(a, e, dtype, f"{case.description}: output {i}", m)
        for name in grads_ref:
            assert_close_scaled(grads[name], grads_ref[name], dtype, f"{case.description}: grad {name}",
                                grads_abs[name])
        return
    out_exact, grads_exact = run(in_float64(case), "torch", monkeypatch)
    # Formula errors show in the float64 cases (tolerance 1e-11); float32 checks numerical sanity.
    out_abs, grads_abs = run(in_float64(case, absolute=True), "torch", monkeypatch)
    for i, (a, e, x, m) in enumerate(zip(out, out_ref, out_exact, out_abs)):
        if case.op == "topk_encode" and i == 1 and _same_selection_up_to_near_ties(a, e, out_ref[0]):
            continue
        _assert_as_accurate_as_reference(a, e, x, m, f"{case.description}: output {i}")
    for name in grads_ref:
        _assert_as_accurate_as_reference(grads[name], grads_ref[name], grads_exact[name], grads_abs[name],
                                         f"{case.description}: grad {name}")


def frozen_ghost_loss(case: Case) -> Callable:
    """The ghost loss of `case` as a function of (x, W_enc, b_enc) with its detached factors (the
    per-row scale and the loss ratio) frozen at their values: the function whose true gradient
    ghost_grad_loss's backward must return."""
    f = case.fixed
    x0, W0, b0 = (case.leaves[n].double() for n in ("x", "W_enc", "b_enc"))
    D, r, mse_main, eps = f["dead_idx"], f["residual"].double(), f["mse_main"].double(), 1e-8
    V = f["W_dec"].double()[D]
    ghost0 = torch.exp(x0 @ W0[:, D] + b0[D]) @ V
    scale = r.norm(dim=-1, keepdim=True) / (2 * ghost0.norm(dim=-1, keepdim=True) + eps)
    loss0 = reference.squared_error(ghost0 * scale, r)
    factor = mse_main / (loss0 + eps)

    def loss(x, W_enc, b_enc):
        ghost = torch.exp(x @ W_enc[:, D] + b_enc[D]) @ V
        return reference.squared_error(ghost * scale, r) * factor

    return loss
