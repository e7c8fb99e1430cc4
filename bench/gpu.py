"""GPU benchmark of sparsekit's Triton path (``make bench-gpu``): every op and a full TopK step.

For each shape (d=768..4096, n=32k..262k, k=32..128, B=4096..16384) and dtype (float32, bfloat16)
it measures, in one run on one device:

- the floors: the cuBLAS encoder GEMM (``torch.addmm``: TFLOP/s) and device copy bandwidth
  (``Tensor.copy_`` of a 1 GiB buffer: GB/s counting read + write);
- every op on the Triton path, forward (and backward where it has one), with achieved TFLOP/s
  (encoders: their GEMM's FLOPs) or GB/s (decoders: bytes gathered + written), the ratio to the
  cuBLAS GEMM (encoders, the TopK step) or the fraction of copy bandwidth (decoders);
- the same work done the plain torch way (dense ``x @ W`` + ``torch.topk``; a dense decode of
  scattered codes) and, for decoders and the step, the sparsify-style ``F.embedding_bag`` decode.

TopK is timed in each design the Triton path has, as separate rows: the default (bf16: top-k fused into
the GEMM's epilogue, ``fused_topk.py``; fp32: the bf16 screen where its crossover takes it), fused with
the screen off (fp32), and unfused (SPARSEKIT_GPU_TOPK=unfused: the GEMM writes pre, radix select);
``--topk-only`` times only those rows and the floors.

Targets (issue 5, H100/H200): TopK step <= 1.3x the cuBLAS encoder GEMM; sparse decode >= 70% of
the measured copy bandwidth. Prints a table last and writes JSON (``--json``).

Without a CUDA device it exits with a message (status 2). ``--tiny`` runs every code path on tiny
shapes instead, on CPU tensors under Triton's interpreter when there is no GPU (the tests do).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import backend_forced_to, env_set  # noqa: E402
from gpu_roofline import (  # noqa: E402
    STEP_FUSED,
    STEP_ROUNDS,
    STEP_SCREEN_PASSES,
    STEP_UNFUSED,
    TOPK_FUSED,
    TOPK_ROUNDS,
    TOPK_SCREEN_PASSES,
    TOPK_UNFUSED,
)

GPU_SHAPES = [  # (B, d, n, k)
    (4096, 768, 32768, 32),
    (8192, 2048, 131072, 64),
    (16384, 4096, 262144, 128),
]
TINY_SHAPES = [(8, 16, 64, 4), (5, 7, 33, 1)]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
COPY_BYTES = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes; without a GPU, CPU tensors under Triton's interpreter (a smoke test)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated B:d:n:k shapes (default: the three GPU shapes)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from fp32, bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--topk-only", action="store_true",
                        help="only the floors and the TopK rows (encode and step, every design)")
    parser.add_argument("--json", default=None, help="where to write the JSON (default bench/results/gpu-<date>.json)")
    parser.add_argument("--predict", action="store_true",
                        help="no GPU needed: print the roofline bound of every kernel and of a TopK step "
                             "(bench/gpu_roofline.py) at the shapes and dtypes asked for")
    parser.add_argument("--card", default="h100", choices=("h100", "h200"),
                        help="datasheet peaks for --predict (default h100)")
    parser.add_argument("--measured", default=None,
                        help="with --predict: a bench/gpu.py JSON report whose times go beside the bounds")
    args = parser.parse_args(argv)
    try:
        args.shape_list = ([tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes
                           else (TINY_SHAPES if args.tiny else GPU_SHAPES))
        if any(len(s) != 4 or min(s) < 1 or s[3] > s[2] for s in args.shape_list):
            raise ValueError
    except ValueError:
        parser.error(f"--shapes must be B:d:n:k with positive sizes and k <= n, got {args.shapes!r}")
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtype_list if d not in DTYPES]
    if unknown or not args.dtype_list:
        parser.error(f"--dtypes must name fp32 and/or bf16, got {args.dtypes!r}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


@dataclass
class Row:
    name: str
    shape: str
    dtype: str
    seconds: float | None
    rate: float | None = None        # TFLOP/s or GB/s
    unit: str = ""
    vs_floor: float | None = None    # x cuBLAS GEMM (compute) or fraction of copy bandwidth (memory)
    floor: str = ""
    vs_torch: float | None = None    # sparsekit time / plain torch time
    vs_embedding_bag: float | None = None
    note: str = ""


class Bench:
    def __init__(self, torch, device, repeats: int):
        self.torch = torch
        self.device = device
        self.repeats = repeats

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def time(self, fn) -> float:
        """Median seconds of fn() over the repeats, after one warm-up call (compiles, autotunes)."""
        fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start = self.torch.cuda.Event(enable_timing=True)
                end = self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)

    def try_time(self, fn) -> tuple[float | None, str]:
        try:
            return self.time(fn), ""
        except self.torch.cuda.OutOfMemoryError:
            self.torch.cuda.empty_cache()
            return None, "out of memory"
        except NotImplementedError as error:  # e.g. torch's embedding_bag backward has no bfloat16 CUDA kernel
            return None, f"not implemented in torch: {str(error)[:80]}"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _design(topk: str):
    """One TopK design alone, for the duration: SPARSEKIT_GPU_TOPK=topk with the bf16 screen off; or
    "screen passes" (the screen through a written a) or "rounds" (the fused epilogue without packed keys)."""
    stack = contextlib.ExitStack()
    if topk == "screen passes":
        stack.enter_context(env_set("SPARSEKIT_GPU_SCREEN_SELECT", "passes"))
        return stack
    if topk == "rounds":
        stack.enter_context(env_set("SPARSEKIT_GPU_TOPK_EPILOGUE", "rounds"))
        return stack
    stack.enter_context(env_set("SPARSEKIT_GPU_TOPK", topk))
    stack.enter_context(env_set("SPARSEKIT_GPU_BF16_SCREEN", "off"))
    return stack


def bench_shape(bench: Bench, shape, dtype_name: str, topk_only: bool = False) -> list[Row]:
    import torch
    import torch.nn.functional as F

    import sparsekit

    batch, d, n, k = shape
    dtype = getattr(torch, DTYPES[dtype_name])
    dev = bench.device
    label = f"B={batch} d={d} n={n} k={k}"
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=dev, dtype=torch.float32) * scale).to(dtype)

    x = randn(batch, d)
    W_enc, b_enc = randn(d, n, scale=d ** -0.5), randn(n, scale=0.1)
    W_dec, b_dec = randn(n, d, scale=n ** -0.5), randn(d, scale=0.1)
    log_threshold = torch.full((n,), -1.0, device=dev, dtype=dtype)
    rows: list[Row] = []
    element = x.element_size()
    gemm_flops = 2.0 * batch * d * n

    def add(name, seconds, note="", rate=None, unit="", vs_floor=None, floor="", vs_torch=None, vs_bag=None):
        rows.append(Row(name, label, dtype_name, seconds, rate, unit, vs_floor, floor, vs_torch, vs_bag, note))

    # Floors: the cuBLAS GEMM and copy bandwidth.
    gemm_s, note = bench.try_time(lambda: torch.addmm(b_enc, x, W_enc))
    add("cuBLAS encoder GEMM (floor)", gemm_s, note, gemm_flops / gemm_s / 1e12 if gemm_s else None, "TFLOP/s", 1.0,
        "GEMM")
    copy_bytes = COPY_BYTES if dev.type == "cuda" else 2**20
    src = torch.empty(copy_bytes // 4, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = bench.time(lambda: dst.copy_(src))  # noqa: F821  (ruff: the names are deleted below, after the call)
    copy_bw = 2 * copy_bytes / copy_s / 1e9
    add("device copy (floor)", copy_s, "", copy_bw, "GB/s", 1.0, "copy BW")
    del src, dst

    def encoder_row(name, sparsekit_fn, torch_fn, design=None):
        from sparsekit.kernels import fused_topk

        before = dict(fused_topk.stats)
        with backend_forced_to("triton"), (_design(design) if design else contextlib.nullcontext()):
            seconds, note = bench.try_time(sparsekit_fn)
        fused_rows = fused_topk.stats["rows"] - before["rows"]
        if fused_rows and not note:  # the fused TopK ran: how many rows overflowed a tile and ran again
            note = f"fused: {100 * (fused_topk.stats['overflow_rows'] - before['overflow_rows']) / fused_rows:.2g}% rows rerun"
        torch_s, torch_note = torch_fn if isinstance(torch_fn, tuple) else bench.try_time(torch_fn)
        add(name, seconds, note or torch_note, gemm_flops / seconds / 1e12 if seconds else None, "TFLOP/s",
            _ratio(seconds, gemm_s), "x GEMM", _ratio(seconds, torch_s))
        return torch_s, torch_note

    def topk_fn():
        return sparsekit.topk_encode(x, W_enc, b_enc, k)

    torch_topk = encoder_row("topk_encode fwd", topk_fn, lambda: torch.addmm(b_enc, x, W_enc).topk(k, dim=-1))
    if dtype_name == "fp32":
        encoder_row(TOPK_FUSED, topk_fn, torch_topk, "fused")
        encoder_row(TOPK_SCREEN_PASSES, topk_fn, torch_topk, "screen passes")
    else:
        encoder_row(TOPK_ROUNDS, topk_fn, torch_topk, "rounds")
    encoder_row(TOPK_UNFUSED, topk_fn, torch_topk, "unfused")
    if topk_only:
        return rows + step_rows(bench, x, W_enc, b_enc, W_dec, b_dec, k, gemm_s, label, dtype_name)
    encoder_row("batchtopk_encode fwd", lambda: sparsekit.batchtopk_encode(x, W_enc, b_enc, k),
                lambda: torch.addmm(b_enc, x, W_enc).relu_().flatten().topk(batch * k))
    encoder_row("relu_encode fwd", lambda: sparsekit.relu_encode(x, W_enc, b_enc),
                lambda: torch.addmm(b_enc, x, W_enc).relu_())
    encoder_row("jumprelu_encode fwd", lambda: sparsekit.jumprelu_encode(x, W_enc, b_enc, log_threshold),
                lambda: (lambda pre: pre * (pre > log_threshold.exp()))(torch.addmm(b_enc, x, W_enc)))

    # Decoders: codes from the encoder, then gather-bound decodes.
    with backend_forced_to("triton"):
        values, indices = sparsekit.topk_encode(x, W_enc, b_enc, k)
    values = values.abs() + 0.1
    decode_bytes = (batch * k * d + 2 * batch * d) * element + batch * k * (element + 8)

    def decode_row(name, sparsekit_fn, bag_fn, dense_fn, traffic):
        with backend_forced_to("triton"):
            seconds, note = bench.try_time(sparsekit_fn)
        bag_s, _ = bench.try_time(bag_fn) if bag_fn else (None, "")
        dense_s, dense_note = bench.try_time(dense_fn)
        add(name, seconds, note or dense_note, traffic / seconds / 1e9 if seconds else None, "GB/s",
            traffic / seconds / 1e9 / copy_bw if seconds else None, "of copy BW", _ratio(seconds, dense_s),
            _ratio(seconds, bag_s))

    def dense_decode(v, i):
        return torch.zeros(batch, n, device=dev, dtype=dtype).scatter_(1, i, v) @ W_dec + b_dec

    decode_row("sparse_decode fwd", lambda: sparsekit.sparse_decode(values, indices, W_dec, b_dec),
               lambda: F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec,
               lambda: dense_decode(values, indices), decode_bytes)
    rows_coo = torch.arange(batch, device=dev).repeat_interleave(k)
    flat_values, flat_cols = values.reshape(-1), indices.reshape(-1)
    decode_row("sparse_decode_coo fwd",
               lambda: sparsekit.sparse_decode_coo(flat_values, rows_coo, flat_cols, W_dec, b_dec, batch), None,
               lambda: dense_decode(values, indices), decode_bytes)

    grad_y = randn(batch, d)
    values_leaf = values.detach().requires_grad_()
    W_dec_leaf = W_dec.detach().requires_grad_()

    def decode_backward(fn):
        def run():
            out = fn()
            torch.autograd.grad(out, (values_leaf, W_dec_leaf), grad_y)
        return run

    # Backward traffic: grad values reads the gathered rows and grad_y; grad W_dec reads grad_y per entry
    # and writes W_dec's shape.
    backward_bytes = 2 * batch * k * d * element + n * d * element
    for deterministic in ("1", "0"):
        os.environ["SPARSEKIT_DETERMINISTIC"] = deterministic
        kind = "deterministic" if deterministic == "1" else "atomic"
        decode_row(f"sparse_decode fwd+bwd ({kind})",
                   decode_backward(lambda: sparsekit.sparse_decode(values_leaf, indices, W_dec_leaf, b_dec)),
                   decode_backward(lambda: F.embedding_bag(indices, W_dec_leaf, per_sample_weights=values_leaf,
                                                           mode="sum")),
                   decode_backward(lambda: torch.zeros(batch, n, device=dev, dtype=dtype).scatter(
                       1, indices, values_leaf) @ W_dec_leaf),
                   decode_bytes + backward_bytes)
    os.environ.pop("SPARSEKIT_DETERMINISTIC", None)

    # Ghost grads over 1% dead latents, forward + backward.
    n_dead = max(1, n // 100)
    dead = torch.randperm(n, generator=gen, device=dev)[:n_dead]
    ghost_leaves = [t.detach().requires_grad_() for t in (x, W_enc, b_enc)]
    residual, mse_main = randn(batch, d), torch.tensor(1.0, device=dev, dtype=dtype)

    def ghost_step():
        loss = sparsekit.ghost_grad_loss(*ghost_leaves, W_dec, dead, residual, mse_main)
        torch.autograd.grad(loss, ghost_leaves)

    def ghost_torch():
        with backend_forced_to("torch"):
            ghost_step()

    with backend_forced_to("triton"):
        ghost_s, note = bench.try_time(ghost_step)
    ghost_torch_s, _ = bench.try_time(ghost_torch)
    ghost_flops = 5 * 2.0 * batch * d * n_dead  # two GEMMs forward, three backward
    add(f"ghost_grad_loss fwd+bwd (|D|={n_dead})", ghost_s, note,
        ghost_flops / ghost_s / 1e12 if ghost_s else None, "TFLOP/s", _ratio(ghost_s, gemm_s), "x GEMM",
        _ratio(ghost_s, ghost_torch_s))

    return rows + step_rows(bench, x, W_enc, b_enc, W_dec, b_dec, k, gemm_s, label, dtype_name)


def step_rows(bench: Bench, x, W_enc, b_enc, W_dec, b_dec, k: int, gemm_s, label: str, dtype_name: str) -> list[Row]:
    """A full TopK step (encode, decode, MSE, backward to every parameter; no optimizer) in each design,
    beside the plain torch step and the F.embedding_bag one."""
    import torch
    import torch.nn.functional as F

    import sparsekit

    rows: list[Row] = []

    def add(name, seconds, note, vs_torch, vs_bag):
        rows.append(Row(name, label, dtype_name, seconds, None, "", _ratio(seconds, gemm_s), "x GEMM", vs_torch,
                        vs_bag, note))

    params = [p.detach().clone().requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]

    def step_sparsekit():
        We, be, Wd, bd = params
        codes = sparsekit.topk_encode(x, We, be, k)
        y = sparsekit.sparse_decode(codes.values, codes.indices, Wd, bd)
        (y - x).float().pow(2).sum(-1).mean().backward()

    def step_dense():
        We, be, Wd, bd = params
        pre = torch.addmm(be, x, We)
        v, i = pre.topk(k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, i, v.relu())
        ((codes @ Wd + bd) - x).float().pow(2).sum(-1).mean().backward()

    def step_bag():
        We, be, Wd, bd = params
        v, i = torch.addmm(be, x, We).topk(k, dim=-1)
        y = F.embedding_bag(i, Wd, per_sample_weights=v.relu(), mode="sum") + bd
        (y - x).float().pow(2).sum(-1).mean().backward()

    dense_s, dense_note = bench.try_time(step_dense)
    bag_s, bag_note = bench.try_time(step_bag)
    designs = [("TopK step (encode+decode+MSE+backward)", None)]
    designs += ([(STEP_FUSED, "fused"), (STEP_SCREEN_PASSES, "screen passes")] if dtype_name == "fp32"
                else [(STEP_ROUNDS, "rounds")])
    for name, design in designs + [(STEP_UNFUSED, "unfused")]:
        with backend_forced_to("triton"), (_design(design) if design else contextlib.nullcontext()):
            step_s, note = bench.try_time(step_sparsekit)
        add(name, step_s, note or dense_note or bag_note, _ratio(step_s, dense_s), _ratio(step_s, bag_s))
    return rows


def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def table(rows: list[Row]) -> str:
    header = ["op", "shape", "dtype", "ms", "rate", "vs floor", "vs torch", "vs emb_bag", "note"]
    lines = [header]
    for r in rows:
        floor = f"{_fmt(r.vs_floor)} {r.floor}" if r.vs_floor is not None else "-"
        lines.append([r.name, r.shape, r.dtype, _fmt(r.seconds * 1e3 if r.seconds else None, 4),
                      f"{_fmt(r.rate)} {r.unit}" if r.rate else "-", floor, _fmt(r.vs_torch), _fmt(r.vs_embedding_bag),
                      r.note])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)


def predict(args) -> int:
    """--predict: the roofline table, with measured times from --measured beside it."""
    import gpu_roofline

    measured = None
    if args.measured:
        try:
            measured = gpu_roofline.measured_seconds(json.loads(Path(args.measured).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"bench/gpu.py: --measured {args.measured}: not a bench/gpu.py JSON report ({error})", file=sys.stderr)
            return 2
    spec = gpu_roofline.CARDS[args.card]
    print(f"Roofline bounds on {spec['name']}: HBM {spec['hbm'] / 1e12:.2f} TB/s, bf16 {spec['bf16'] / 1e12:.0f} "
          f"TFLOP/s, fp32 FMA {spec['fp32'] / 1e12:.0f} TFLOP/s, int32 {spec['int32'] / 1e12:.1f} T ops/s. "
          "A kernel's bound is its busiest unit's time (tensor or FMA units, integer pipes, HBM); a step's is "
          "the sum over its kernels. 'x bf16 GEMM': over the bf16 encoder GEMM's bound (issue 20's target "
          "for the step: <= 1.5). 'serial': as if no kernel's integer work overlapped its FLOPs.")
    print(gpu_roofline.table(gpu_roofline.prediction_rows(args.shape_list, args.dtype_list, args.card, measured)))
    print()
    print(gpu_roofline.occupancy_note())
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.predict:
        return predict(args)
    import torch

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.tiny:
        print("bench/gpu.py needs a CUDA device, and torch.cuda.is_available() is False here.\n"
              "Run `make bench-gpu` on a GPU machine, or `python bench/gpu.py --tiny` to exercise the code\n"
              "paths on tiny shapes under Triton's interpreter (no timings worth reading).", file=sys.stderr)
        return 2
    if not has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before sparsekit.kernels is first imported
    from sparsekit.ops.backend import triton_installed
    if not triton_installed():
        print("bench/gpu.py needs Triton: pip install 'sparsekit[gpu]'", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda" if has_cuda else "cpu")
    bench = Bench(torch, device, 1 if args.tiny and not has_cuda else args.repeats)
    dtypes = ["fp32"] if args.tiny and not has_cuda else args.dtype_list
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if has_cuda else f"CPU ({platform.processor() or 'unknown'}), "
                                                                  "Triton interpreter",
        "interpreter": not has_cuda, "tiny": args.tiny, "repeats": bench.repeats,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    path = Path(args.json) if args.json else (
        Path(__file__).parent / "results" / f"gpu-{meta['date'][:10]}{'-tiny' if args.tiny else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for shape in args.shape_list:
        for dtype_name in dtypes:
            print(f"measuring B={shape[0]} d={shape[1]} n={shape[2]} k={shape[3]} {dtype_name} ...", file=sys.stderr,
                  flush=True)
            started = time.perf_counter()
            rows.extend(bench_shape(bench, shape, dtype_name, args.topk_only))
            if has_cuda:
                torch.cuda.empty_cache()
            # Written after every shape and dtype, so a run stopped part-way keeps what it measured.
            path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
            print(f"  done in {time.perf_counter() - started:.1f} s (compiles and autotuning included)", file=sys.stderr,
                  flush=True)
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; JSON: {path}")
    print("rate: encoders count their GEMM's FLOPs, ghost grads its five |D|-wide GEMMs; decoders count bytes moved.")
    print("vs floor: x the cuBLAS GEMM's time (lower is better) or the fraction of copy bandwidth (higher is better);")
    print("vs torch / vs emb_bag: sparsekit's time over the plain torch / F.embedding_bag path (below 1: sparsekit faster).")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
