"""Roofline prediction for the Triton path (``python bench/gpu.py --predict``): no GPU needed.

For each shape of ``bench/gpu.py`` and each dtype it counts, kernel by kernel as the kernels are built
today (``kernels/sparsekit_kernels``), the FLOPs and the bytes that must cross HBM at least once, and
the time bound ``max(FLOPs / peak, bytes / bandwidth)`` on a card's datasheet peaks. Summing the
kernels of a forward and backward TopK step (optimizer excluded) gives the step's bound, compared
with the bound of the bf16 encoder GEMM alone (issue 20's yardstick: step <= 1.5x that).

What each kernel moves (B rows, d = d_in, n latents, k active, s bytes per element, 8 per int64 index):

- encoder GEMM ``pre = x @ W_enc + b_enc``: 2·B·d·n FLOPs; reads x and W_enc, writes pre [B, n];
- TopK/BatchTopK selection (``select.py``, radix select): four 8-bit histogram passes and one
  compaction pass, each reading pre: 5·B·n·s, then writes B·k values and indices;
- sparse decode ``codes @ W_dec + b_dec``: reads the codes and the rows of W_dec they name, writes [B, d];
- decode backward: grad values (B·k dot products: grad_y and the gathered rows again) and grad W_dec
  (entries sorted by latent, then each latent's rows of grad_y summed; n·d·s written, zero rows
  included);
- encoder backward: grad W_enc = x^T·S (as grad W_dec, over rows of x) and grad x = S·W_enc^T (the
  columns of W_enc the codes name, gathered as rows of one transposed contiguous copy of W_enc: the
  copy's two passes over n·d are counted; reading the columns in place read 8-16x more, issue 20 point 3);
- the MSE and its gradient: a few passes over [B, d].

Gathered rows count once each (min(B·k, n) rows of W_dec or W_enc, B rows of x or grad_y): the
bytes that must cross HBM at least once, so every figure is a lower bound on time; a kernel whose
gathers miss in L2 moves up to B·k rows instead (2x-4x more at the bench's shapes). fp32 GEMMs run
on the FMA units (IEEE float32, TF32 off: the default); bf16 on the tensor cores.

Three designs are shown for the encoder: ``as built`` (GEMM writes pre, selection reads it five
times), ``fused`` (a running top-k in the GEMM's epilogue, not built: pre never reaches HBM), and, for
float32, the bf16 screen as built (``screen.py``: a bf16 GEMM writing float32 a, six passes over a,
the candidates recomputed in float32; candidates per row as measured where ``SCREEN_CANDIDATES`` has
the shape, else assumed 4k).
"""
from __future__ import annotations

from dataclasses import dataclass

# Datasheet peaks (dense, no sparsity): NVIDIA H100 SXM5 and H200 SXM; the H200 has the H100's
# compute and HBM3e at 4.8 TB/s. Measured on one H200 here (2026-12-04): bf16 cuBLAS 671 TFLOP/s at
# B=4096, d=768, n=32768; copy 4.21 TB/s.
CARDS = {
    "h100": dict(name="H100 SXM (datasheet)", hbm=3.35e12, bf16=989e12, tf32=494e12, fp32=67e12),
    "h200": dict(name="H200 SXM (datasheet)", hbm=4.8e12, bf16=989e12, tf32=494e12, fp32=67e12),
}
INDEX_BYTES = 8


@dataclass
class Kernel:
    name: str
    flops: float
    bytes: float
    peak: float       # FLOP/s of the units this kernel's FLOPs run on
    bandwidth: float  # bytes/s

    @property
    def seconds(self) -> float:
        return max(self.flops / self.peak, self.bytes / self.bandwidth)

    @property
    def limit(self) -> str:
        return "compute" if self.flops / self.peak >= self.bytes / self.bandwidth else "memory"


# Candidates per row the bf16 screen recomputes in float32 (Gaussian data; the GPU screen's plain-torch
# reference, same bound as the kernels: docs/backends.md), by (d, n, k); other shapes assume 4k.
SCREEN_CANDIDATES = {(768, 32768, 32): 66.0, (2048, 131072, 64): 270.0}


def screen_candidates(d: int, n: int, k: int) -> tuple[float, bool]:
    """(candidates per row, measured?) for the bf16 screen at this shape."""
    if (d, n, k) in SCREEN_CANDIDATES:
        return SCREEN_CANDIDATES[(d, n, k)], True
    return min(4.0 * k, n), False


def screen_kernels(B: int, d: int, n: int, k: int, card: str = "h100") -> list[Kernel]:
    """The float32 TopK encoder through the bf16 screen as built (kernels/sparsekit_kernels/screen.py):
    bf16 GEMM with float32 output a, the row's k-th largest a (radix select: 5 passes), one comparison
    pass for the coarse candidates, and c candidates per row recomputed in float32."""
    spec = CARDS[card]
    c, _ = screen_candidates(d, n, k)
    codes = B * k * (4 + INDEX_BYTES)
    return [
        Kernel("bf16 screen GEMM (float32 a)", 2.0 * B * d * n, 2 * (B * d + d * n) + 4 * B * n, spec["bf16"],
               spec["hbm"]),
        Kernel("screen: k-th largest a + coarse pass (6 passes over a)", 0.0, 6 * 4 * B * n, spec["fp32"],
               spec["hbm"]),
        Kernel(f"screen: {c:.0f} candidates/row recomputed in fp32", 2.0 * B * c * d,
               B * c * (4 + INDEX_BYTES) + min(B * c, n) * d * 4 + B * d * 4 + codes, spec["fp32"], spec["hbm"]),
    ]


def step_kernels(B: int, d: int, n: int, k: int, dtype: str, card: str = "h100", fused: bool = False,
                 screened: bool = False) -> list[Kernel]:
    """Every kernel of one forward + backward TopK step, in order. dtype: "fp32" or "bf16";
    ``screened``: the float32 encoder through the bf16 screen; ``fused``: top-k in the GEMM epilogue."""
    spec = CARDS[card]
    s = 4 if dtype == "fp32" else 2
    gemm_peak = spec["fp32"] if dtype == "fp32" else spec["bf16"]
    fma_peak = spec["fp32"]  # elementwise and gather arithmetic: never the limit here
    bw = spec["hbm"]
    codes = B * k * (s + INDEX_BYTES)
    weight_rows = min(B * k, n) * d * s  # the distinct rows of W_dec (or columns of W_enc) the codes touch
    batch_rows = B * d * s               # x or grad_y, each row used by its k entries
    kernels = []
    if screened:
        kernels += screen_kernels(B, d, n, k, card)
    elif fused:
        kernels.append(Kernel("encoder GEMM + fused top-k (not built)", 2.0 * B * d * n,
                              B * d * s + d * n * s + codes, gemm_peak, bw))
    else:
        kernels.append(Kernel("encoder GEMM (writes pre)", 2.0 * B * d * n, B * d * s + d * n * s + B * n * s,
                              gemm_peak, bw))
        kernels.append(Kernel("top-k selection (5 passes over pre)", 0.0, 5 * B * n * s + codes, fma_peak, bw))
    kernels += [
        Kernel("sparse decode", 2.0 * B * k * d, codes + weight_rows + batch_rows, fma_peak, bw),
        Kernel("MSE + its gradient", 4.0 * B * d, 3 * batch_rows, fma_peak, bw),
        Kernel("decode bwd: grad values", 2.0 * B * k * d, batch_rows + weight_rows + B * k * s, fma_peak, bw),
        Kernel("decode bwd: grad W_dec (sort + segment sum)", 2.0 * B * k * d,
               4 * B * k * 2 * INDEX_BYTES + batch_rows + n * d * s, fma_peak, bw),
        Kernel("encoder bwd: grad W_enc, b_enc (segment sum)", 2.0 * B * k * d, batch_rows + d * n * s + n * s,
               fma_peak, bw),
        Kernel("encoder bwd: W_enc transposed copy", 0.0, 2 * n * d * s, fma_peak, bw),
        Kernel("encoder bwd: grad x (gathered W_enc columns)", 2.0 * B * k * d, codes + weight_rows + batch_rows,
               fma_peak, bw),
    ]
    return kernels


def bf16_gemm_bound(B: int, d: int, n: int, card: str = "h100") -> float:
    """Seconds: the bf16 encoder GEMM alone (x, W_enc read, pre written once), issue 20's yardstick."""
    spec = CARDS[card]
    return Kernel("bf16 GEMM", 2.0 * B * d * n, 2 * (B * d + d * n + B * n), spec["bf16"], spec["hbm"]).seconds


# bench/gpu.py rows whose measured time a sum of predicted kernels bounds.
MEASURED_AS = {
    "topk_encode fwd": ("encoder GEMM (writes pre)", "top-k selection (5 passes over pre)"),
    "sparse_decode fwd": ("sparse decode",),
    "sparse_decode fwd+bwd (deterministic)": ("sparse decode", "decode bwd: grad values",
                                              "decode bwd: grad W_dec (sort + segment sum)"),
}
STEP = "TopK step (encode+decode+MSE+backward)"


def prediction_rows(shapes, dtypes, card: str = "h100", measured: dict | None = None) -> list[dict]:
    """One dict per kernel, per bench row it bounds, and per step (as built and fused): shape, dtype,
    name, GFLOP, MB, bound_us, limit, x_bf16_gemm (bound / the bf16 GEMM's bound), and measured_us
    with measured_over_bound where ``measured`` ({(shape label, dtype, name): seconds}) has it."""
    measured = measured or {}
    rows = []
    for B, d, n, k in shapes:
        label = f"B={B} d={d} n={n} k={k}"
        yardstick = bf16_gemm_bound(B, d, n, card)
        for dtype in dtypes:
            kernels = step_kernels(B, d, n, k, dtype, card)
            by_name = {kern.name: kern for kern in kernels}

            def add(name, flops, nbytes, seconds, limit, bench_name=None):
                got = measured.get((label, dtype, bench_name or name))
                rows.append(dict(shape=label, dtype=dtype, name=name, gflop=flops / 1e9, mb=nbytes / 1e6,
                                 bound_us=seconds * 1e6, limit=limit, x_bf16_gemm=seconds / yardstick,
                                 measured_us=got * 1e6 if got else None,
                                 measured_over_bound=got / seconds if got else None))

            for kern in kernels:
                add(kern.name, kern.flops, kern.bytes, kern.seconds, kern.limit)
            for bench_name, parts in MEASURED_AS.items():
                chosen = [by_name[p] for p in parts]
                add(f"= {bench_name}", sum(c.flops for c in chosen), sum(c.bytes for c in chosen),
                    sum(c.seconds for c in chosen), "sum", bench_name)
            add(f"= {STEP}, as built", sum(c.flops for c in kernels), sum(c.bytes for c in kernels),
                sum(c.seconds for c in kernels), "sum", STEP)
            fused = step_kernels(B, d, n, k, dtype, card, fused=True)
            add("= TopK step, top-k fused into the GEMM (not built)", sum(c.flops for c in fused),
                sum(c.bytes for c in fused), sum(c.seconds for c in fused), "sum")
            if dtype == "fp32":
                screened = step_kernels(B, d, n, k, dtype, card, screened=True)
                for kern in screened[:3]:
                    add(kern.name, kern.flops, kern.bytes, kern.seconds, kern.limit)
                measured_c = screen_candidates(d, n, k)[1]
                add(f"= TopK step, fp32 through the bf16 screen ({'measured' if measured_c else 'assumed'} "
                    "candidates)", sum(c.flops for c in screened), sum(c.bytes for c in screened),
                    sum(c.seconds for c in screened), "sum")
    return rows


def measured_seconds(report: dict) -> dict:
    """{(shape label, dtype, bench row name): seconds} from a bench/gpu.py JSON report."""
    return {(r["shape"], r["dtype"], r["name"]): r["seconds"] for r in report["rows"] if r.get("seconds")}


def table(rows: list[dict]) -> str:
    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}g}"

    header = ["kernel / bench row", "shape", "dtype", "GFLOP", "MB", "bound µs", "limit", "x bf16 GEMM",
              "measured µs", "measured / bound"]
    lines = [header] + [[r["name"], r["shape"], r["dtype"], fmt(r["gflop"]), fmt(r["mb"]), fmt(r["bound_us"]),
                         r["limit"], fmt(r["x_bf16_gemm"]), fmt(r["measured_us"], 4), fmt(r["measured_over_bound"])]
                        for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)
