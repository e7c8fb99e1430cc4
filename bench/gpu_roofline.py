"""Roofline prediction for the Triton path (``python bench/gpu.py --predict``): no GPU needed.

For each shape of ``bench/gpu.py`` and each dtype it counts, kernel by kernel as the kernels are built
today (``kernels/sparsekit_kernels``), the FLOPs, the integer instructions of fused epilogues and the
bytes that must cross HBM at least once, and the time bound of each kernel: its busiest unit's time,
``max(FLOPs / peak, integer ops / int32 rate, bytes / bandwidth)``, on a card's datasheet peaks.
Summing the kernels of a forward and backward TopK step (optimizer excluded) gives the step's bound,
compared with the bound of the bf16 encoder GEMM alone (issue 20's yardstick: step <= 1.5x that).
Beside it, "serial": each kernel's integer work added to its FLOPs (no overlap at all); the compiled
kernel's blocks per SM (``compiled_fused_kernel``, from the newest AOT compile report) say whether
its epilogue can overlap another block's MMAs.

What each kernel moves (B rows, d = d_in, n latents, k active, s bytes per element, 8 per int64 index):

- encoder GEMM ``pre = x @ W_enc + b_enc``: 2·B·d·n FLOPs; reads x and W_enc; unfused, writes pre
  [B, n] and the TopK selection (``select.py``, radix select: four 8-bit histogram passes and one
  compaction pass) reads it 5 times, then writes B·k values and indices; fused, writes
  B·tiles·(KT+1) int64 keys (tiles = n / 128), which the merge reads once;
- sparse decode ``codes @ W_dec + b_dec``: reads the codes and the rows of W_dec they name, writes [B, d];
- decode backward: grad W_dec and grad values in one pass by latent (entries sorted by latent; each
  latent's row of W_dec read once, its entries' rows of grad_y summed into grad W_dec and dotted with
  it; n·d·s written, zero rows included; float32 dot partials per 256 columns);
- encoder backward: grad W_enc = x^T·S (as grad W_dec, over rows of x); grad x = S·W_enc^T only where x
  requires grad (not in an SAE's step or the bench's: ``step_kernels(grad_x=True)``), from the columns
  of W_enc the codes name, gathered as rows of one transposed contiguous copy of W_enc (the copy's two
  passes over n·d counted; reading the columns in place read 8-16x more, issue 20 point 3);
- the MSE and its gradient: a few passes over [B, d].

Gathered rows count once each (min(B·k, n) rows of W_dec or W_enc, B rows of x or grad_y): the
bytes that must cross HBM at least once, so every figure is a lower bound on time; a kernel whose
gathers miss in L2 moves up to B·k rows instead (2x-4x more at the bench's shapes). fp32 GEMMs run
on the FMA units (IEEE float32, TF32 off: the default); bf16 on the tensor cores.

The encoder comes in the designs the Triton path has (``SPARSEKIT_GPU_TOPK``,
``SPARSEKIT_GPU_BF16_SCREEN``): ``fused`` (the default for 16-bit inputs, ``fused_topk.py``): the GEMM
keeps each tile's KT (+1) largest keys per row (KT from ``fused_topk.choose_kt`` at the GPU tile,
BLOCK_N = 128), so pre [B, n] never reaches HBM; its epilogue's integer work (instructions per entry
read off the sm_90 SASS: ``PACKED_OPS_*``) runs on the CUDA cores beside the GEMM's MMAs, in the
same kernel; then the merge reads the keys once, and the rows that overflow (the expected share on
unstructured data) run again with 4x KT. ``unfused`` (SPARSEKIT_GPU_TOPK=unfused):
the GEMM writes pre, the radix selection reads it five times. 16-bit fused epilogues pack the column
into the key's low bits (3 operations per round, 3 for the next key; float32 keeps the 6-operation
rounds). ``screened``: the float32 encoder through the bf16 screen with its candidates found in the
GEMM's epilogue (``screen.topk_encode_screened_fused``: KT truncated packed keys per tile and row, KT
from ``screen.screen_kt``, a [B, n] never written; the merge reads the keys twice and the next keys
once; the rows where a tile may have dropped a candidate run again, the expected share from the
candidates per row as Poisson; the candidates recomputed in float32). ``screened passes``
(SPARSEKIT_GPU_SCREEN_SELECT=passes): a bf16 GEMM writing float32 a, six passes over a. Both count
the screen's own inputs: the norms of x and W_enc and their bf16 copies (uncounted before issue 20's
second round; fused: one pass each, ``screen.split_norms``); the recompute gathers W_enc's columns
in place, in column order. Candidates per row as measured where ``SCREEN_CANDIDATES`` has the shape,
else assumed 4k. "as built" is each dtype's default path:
fused for bf16, screened for fp32 (where the screen's crossover takes it).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Datasheet peaks (dense, no sparsity): NVIDIA H100 SXM5 and H200 SXM; the H200 has the H100's
# compute and HBM3e at 4.8 TB/s. Measured on one H200 here (2026-12-04): bf16 cuBLAS 671 TFLOP/s at
# B=4096, d=768, n=32768; copy 4.21 TB/s.
# int32: the fused epilogue's integer compares, selects, min and max, assumed at 64 per clock per SM
# (half the float32 lane rate; the CUDA programming guide's throughput table, not checked here)
# x 132 SMs x 1.98 GHz. The first GPU run tells (bench/gpu_fused_check.sh).
CARDS = {
    "h100": dict(name="H100 SXM (datasheet)", hbm=3.35e12, bf16=989e12, tf32=494e12, fp32=67e12, int32=16.7e12),
    "h200": dict(name="H200 SXM (datasheet)", hbm=4.8e12, bf16=989e12, tf32=494e12, fp32=67e12, int32=16.7e12),
}
INDEX_BYTES = 8
KEY_BYTES = 8           # the fused kernel's int64 candidate keys
FUSED_BLOCK_N = 128     # its GPU tile width (fused_topk._HOPPER)
EPILOGUE_OPS_PER_ROUND = 6  # per tile entry: 2 compares, 2 selects, a max, a min (sm_90 PTX of a round)
EPILOGUE_OPS_KEY = 6        # per tile entry: the rounding to x's dtype and the order-preserving key
# Packed keys (fused_topk.py: the column in the key's low bits; 16-bit inputs and the screen), read off the
# sm_90 SASS of the compiled kernel (bench/aot_compile.epilogue_instructions: integer/logic-pipe
# instructions per tile entry after the K loop, at KT = 1, 2, 3 with and without the next key;
# 2026-12-05, Triton 3.9): bf16 7.2 / 10.1 / 13.0, 16.0 with the next; the screen's float32 a 5.9 /
# 8.7 / 11.6, 14.5. A round is a max, a compare and a select (~3: the max's share is ~1); the next key
# costs a round too (the last round's removal is dead code without it); the key ~4 (the rounding to
# bf16, a shift and two three-input logic ops, ``fused_topk._packed_key``) or ~3 for a float32 a.
# tests/ops/test_aot_compile.py holds these within one instruction per entry of the compiled code.
PACKED_OPS_PER_ROUND = 3
PACKED_OPS_NEXT = 3
PACKED_OPS_KEY = 4
SCREEN_OPS_KEY = 3


def packed_epilogue_ops(kt: int, next_keys: int, screen: bool = False) -> int:
    """Integer instructions per tile entry of a packed-key epilogue: kt rounds, next_keys (0/1) next keys."""
    return PACKED_OPS_PER_ROUND * kt + PACKED_OPS_NEXT * next_keys + (SCREEN_OPS_KEY if screen else PACKED_OPS_KEY)


SCREEN_KEEP_OVER_K = 4      # screen.SCREEN_KEEP_OVER_K: the fused screen's KT leaves room for 4k per row


@dataclass
class Kernel:
    """One kernel: its FLOPs on the units ``peak`` names, its integer instructions on the CUDA cores
    (a fused epilogue's selection rounds; ``int_peak`` ops/s) and the bytes it moves across HBM.

    ``seconds``, the roofline bound: the busiest of the three, which run side by side (tensor cores,
    integer pipes and memory are separate units; a fused epilogue's rounds of one tile run while
    another tile's MMAs do where two blocks share an SM: ``compiled_occupancy``). ``serial_seconds``:
    the same kernel if its integer work never overlapped its FLOPs (added to them)."""
    name: str
    flops: float
    bytes: float
    peak: float       # FLOP/s of the units this kernel's FLOPs run on
    bandwidth: float  # bytes/s
    int_ops: float = 0.0
    int_peak: float = 1.0

    @property
    def seconds(self) -> float:
        return max(self.flops / self.peak, self.bytes / self.bandwidth, self.int_ops / self.int_peak)

    @property
    def serial_seconds(self) -> float:
        return max(self.flops / self.peak + self.int_ops / self.int_peak, self.bytes / self.bandwidth)

    @property
    def limit(self) -> str:
        times = {"compute": self.flops / self.peak, "memory": self.bytes / self.bandwidth,
                 "int32": self.int_ops / self.int_peak}
        return max(times, key=times.get)


# Candidates per row the bf16 screen recomputes in float32 (Gaussian data; the GPU screen's plain-torch
# reference, same bound as the kernels: docs/backends.md), by (d, n, k); other shapes assume 4k.
SCREEN_CANDIDATES = {(768, 32768, 32): 66.0, (2048, 131072, 64): 270.0}


def screen_candidates(d: int, n: int, k: int) -> tuple[float, bool]:
    """(candidates per row, measured?) for the bf16 screen at this shape."""
    if (d, n, k) in SCREEN_CANDIDATES:
        return SCREEN_CANDIDATES[(d, n, k)], True
    return min(4.0 * k, n), False


def screen_inputs_kernel(B: int, d: int, n: int, card: str = "h100", fused: bool = True) -> Kernel:
    """What a screen design does before its GEMM, per call (screen.py): the bounds' norms of x's rows and
    W_enc's columns and the bf16 copies of x and W_enc (the GEMM's reads of them are its own row).
    Fused: ``screen.split_norms``, one pass each (float32 read, bf16 written). Passes: torch's norms and
    casts, counted as one read for the norms and one read + write for the copies (a floor: they run as
    several float64 passes). Uncounted before issue 20's second round. (The recompute reads W_enc in
    place, its entries in column order: no transposed copy.)"""
    spec = CARDS[card]
    per_element = 4 + 2 if fused else 4 + 4 + 2
    name = "screen: bf16 copies + norms of x, W_enc (one pass each)" if fused else \
        "screen: norms and bf16 copies of x and W_enc (torch; a floor)"
    return Kernel(name, 0.0, (B * d + d * n) * per_element, spec["fp32"], spec["hbm"])


def screen_recompute_kernel(B: int, d: int, n: int, k: int, card: str = "h100") -> Kernel:
    spec = CARDS[card]
    c, _ = screen_candidates(d, n, k)
    codes = B * k * (4 + INDEX_BYTES)
    return Kernel(f"screen: {c:.0f} candidates/row recomputed in fp32", 2.0 * B * c * d,
                  B * c * (4 + INDEX_BYTES) + min(B * c, n) * d * 4 + B * d * 4 + codes, spec["fp32"], spec["hbm"])


def screen_fused_kernels(B: int, d: int, n: int, k: int, card: str = "h100") -> list[Kernel]:
    """The float32 TopK encoder through the bf16 screen with its candidates found in the GEMM's epilogue
    (screen.topk_encode_screened_fused, the default): the bf16 GEMM keeps each tile's KT largest a per
    row as truncated packed keys and the next (a [B, n] never reaches HBM); the merge reads the keys
    twice (their k-th per row; the coarse comparison), the next keys once, and works on the ~c coarse
    entries per row; rows whose tiles may have dropped a candidate run again with 4x KT."""
    spec = CARDS[card]
    c, _ = screen_candidates(d, n, k)
    kt = _screen_kt(n, k)
    tiles = -(-n // FUSED_BLOCK_N)
    rerun = _overflow_share(n, c, kt)
    kept = B * tiles * kt
    keys = B * tiles * (kt + 1) * KEY_BYTES
    ops = B * n * packed_epilogue_ops(kt, 1, screen=True)
    rerun_kt = min(FUSED_BLOCK_N, 4 * kt)
    rerun_ops = rerun * B * n * packed_epilogue_ops(rerun_kt, 1, screen=True)
    return [
        Kernel(f"bf16 screen GEMM + top-{kt} truncated keys per tile (fused; writes keys; epilogue: {kt} packed "
               "max rounds + next)", 2.0 * B * d * n, 2 * (B * d + d * n) + keys, spec["bf16"], spec["hbm"],
               ops, spec["int32"]),
        Kernel(f"screen: merge of the keys (k-th key, coarse test, bounds of ~{c:.0f}/row, overflow test)", 0.0,
               2 * kept * KEY_BYTES + 2 * kept + B * tiles * KEY_BYTES + B * c * 10 * 8, spec["fp32"], spec["hbm"]),
        Kernel(f"screen: overflowed rows run again ({100 * rerun:.2g}% expected)", rerun * 2.0 * B * d * n,
               rerun * (2 * (B * d + d * n) + B * tiles * (rerun_kt + 1) * KEY_BYTES), spec["bf16"], spec["hbm"],
               rerun_ops, spec["int32"]),
        screen_recompute_kernel(B, d, n, k, card),
        screen_inputs_kernel(B, d, n, card, fused=True),
    ]


def _screen_kt(n: int, k: int) -> int:
    from sparsekit.kernels.screen import screen_kt as choose

    return choose(n, k, FUSED_BLOCK_N)


def _overflow_share(n: int, per_row: float, kt: int) -> float:
    """Expected share of rows where some tile holds more than kt of the row's per_row entries (Poisson)."""
    if kt >= FUSED_BLOCK_N:
        return 0.0
    lam = per_row * FUSED_BLOCK_N / n
    term = cdf = math.exp(-lam)
    for j in range(1, kt + 1):
        term *= lam / j
        cdf += term
    return min(1.0, -(-n // FUSED_BLOCK_N) * max(0.0, 1.0 - cdf))


def screen_kernels(B: int, d: int, n: int, k: int, card: str = "h100") -> list[Kernel]:
    """The float32 TopK encoder through the bf16 screen's passes (SPARSEKIT_GPU_SCREEN_SELECT=passes,
    screen.topk_encode_screened_passes): bf16 GEMM with float32 output a, the row's k-th largest a
    (radix select: 5 passes), one comparison pass for the coarse candidates, and c candidates per row
    recomputed in float32."""
    spec = CARDS[card]
    return [
        Kernel("bf16 screen GEMM (float32 a)", 2.0 * B * d * n, 2 * (B * d + d * n) + 4 * B * n, spec["bf16"],
               spec["hbm"]),
        Kernel("screen: k-th largest a + coarse pass (6 passes over a)", 0.0, 6 * 4 * B * n, spec["fp32"],
               spec["hbm"]),
        screen_recompute_kernel(B, d, n, k, card),
        screen_inputs_kernel(B, d, n, card, fused=False),
    ]


def fused_kt(n: int, k: int) -> tuple[int, float]:
    """(KT, expected share of rows that overflow and run again) of the fused TopK at the GPU tile,
    on unstructured data (Poisson, as ``fused_topk.choose_kt``, which picks KT)."""
    from sparsekit.kernels.fused_topk import choose_kt

    kt = choose_kt(n, k, FUSED_BLOCK_N)
    if kt >= min(k, FUSED_BLOCK_N):
        return kt, 0.0
    lam = k * FUSED_BLOCK_N / n
    term = cdf = math.exp(-lam)
    for j in range(1, kt + 1):
        term *= lam / j
        cdf += term
    return kt, min(1.0, -(-n // FUSED_BLOCK_N) * max(0.0, 1.0 - cdf))


def fused_kernels(B: int, d: int, n: int, k: int, dtype: str, card: str = "h100",
                  packed: bool | None = None) -> list[Kernel]:
    """The TopK encoder with the selection fused into the GEMM (kernels/sparsekit_kernels/fused_topk.py);
    ``packed``: packed keys (default: for 16-bit dtypes, as built; SPARSEKIT_GPU_TOPK_EPILOGUE=rounds: not)."""
    packed = dtype != "fp32" if packed is None else packed
    spec = CARDS[card]
    s = 4 if dtype == "fp32" else 2
    gemm_peak = spec["fp32"] if dtype == "fp32" else spec["bf16"]
    kt, rerun = fused_kt(n, k)
    tiles = -(-n // FUSED_BLOCK_N)
    next_keys = 0 if rerun == 0.0 and kt >= min(k, FUSED_BLOCK_N) else 1
    keys = B * tiles * (kt + next_keys) * KEY_BYTES
    codes = B * k * (s + INDEX_BYTES)
    rerun_kt = min(k, FUSED_BLOCK_N, 4 * kt)
    if not packed:  # the round-by-round epilogue (float32: a key has no spare bits)
        epilogue_ops = B * n * (EPILOGUE_OPS_PER_ROUND * (kt + next_keys) + EPILOGUE_OPS_KEY)
        rerun_ops = rerun * B * n * (EPILOGUE_OPS_PER_ROUND * rerun_kt + EPILOGUE_OPS_KEY)
        epilogue = f"{kt + next_keys} max rounds"
    else:  # packed keys
        epilogue_ops = B * n * packed_epilogue_ops(kt, next_keys)
        rerun_ops = rerun * B * n * packed_epilogue_ops(rerun_kt, 0)
        epilogue = f"{kt} packed max rounds{' + next' if next_keys else ''}"
    return [
        Kernel(f"encoder GEMM + top-{kt} per tile (fused; writes keys; epilogue: {epilogue})", 2.0 * B * d * n,
               B * d * s + d * n * s + keys, gemm_peak, spec["hbm"], epilogue_ops, spec["int32"]),
        Kernel("fused: merge of the keys (top-k per row, overflow check)", 0.0, keys + codes, spec["fp32"], spec["hbm"]),
        Kernel(f"fused: overflowed rows run again ({100 * rerun:.2g}% expected)", rerun * 2.0 * B * d * n,
               rerun * (B * d * s + d * n * s + B * tiles * rerun_kt * KEY_BYTES), gemm_peak, spec["hbm"],
               rerun_ops, spec["int32"]),
    ]


def default_encoder(d: int, n: int, k: int, B: int, dtype: str) -> str:
    """The TopK encoder design the Triton path takes by default (auto): the bf16 screen for float32
    where its crossover takes it (screen.use_screen's rule), else fused."""
    if dtype == "fp32" and n >= 64 * k and 2.0 * B * d * n >= 2**30:
        return "screened"
    return "fused"


def step_kernels(B: int, d: int, n: int, k: int, dtype: str, card: str = "h100",
                 encoder: str = "fused", grad_x: bool = False, pre_bias: bool = False) -> list[Kernel]:
    """Every kernel of one forward + backward TopK step, in order. dtype: "fp32" or "bf16"; encoder:
    "fused" (top-k in the GEMM epilogue), "unfused" (GEMM writes pre, radix select) or "screened"
    (the float32 encoder through the bf16 screen). grad_x: x requires grad too (not in an SAE's step
    nor bench/gpu.py's, where x is data: ``encode.sparse_encoder_backward_triton`` then neither
    copies W_enc nor gathers its columns). pre_bias: an SAE's step, b_dec subtracted from x before
    encoding (``ops.autograd.centered_input``: x - b_dec, then b_dec's gradient -W_enc @ grad b_enc)."""
    spec = CARDS[card]
    s = 4 if dtype == "fp32" else 2
    gemm_peak = spec["fp32"] if dtype == "fp32" else spec["bf16"]
    fma_peak = spec["fp32"]  # elementwise and gather arithmetic: never the limit here
    bw = spec["hbm"]
    codes = B * k * (s + INDEX_BYTES)
    weight_rows = min(B * k, n) * d * s  # the distinct rows of W_dec (or columns of W_enc) the codes touch
    batch_rows = B * d * s               # x or grad_y, each row used by its k entries
    kernels = []
    if pre_bias:
        kernels.append(Kernel("pre_bias: x - b_dec", B * d, 2 * batch_rows, fma_peak, bw))
    if encoder == "screened":
        kernels += screen_fused_kernels(B, d, n, k, card)
    elif encoder == "screened passes":
        kernels += screen_kernels(B, d, n, k, card)
    elif encoder == "fused":
        kernels += fused_kernels(B, d, n, k, dtype, card)
    elif encoder == "fused rounds":
        kernels += fused_kernels(B, d, n, k, dtype, card, packed=False)
    elif encoder == "unfused":
        kernels.append(Kernel("encoder GEMM (writes pre)", 2.0 * B * d * n, B * d * s + d * n * s + B * n * s,
                              gemm_peak, bw))
        kernels.append(Kernel("top-k selection (5 passes over pre)", 0.0, 5 * B * n * s + codes, fma_peak, bw))
    else:
        raise ValueError(f"encoder must be 'fused', 'fused rounds', 'unfused', 'screened' or 'screened passes', "
                         f"got {encoder!r}")
    kernels += [
        Kernel("sparse decode", 2.0 * B * k * d, codes + weight_rows + batch_rows, fma_peak, bw),
        Kernel("MSE + its gradient", 4.0 * B * d, 3 * batch_rows, fma_peak, bw),
        Kernel("decode bwd: grad W_dec and grad values (sort + one pass by latent)", 4.0 * B * k * d,
               4 * B * k * 2 * INDEX_BYTES + batch_rows + weight_rows + n * d * s + B * k * (s + 4 * -(-d // 256)),
               fma_peak, bw),
        Kernel("encoder bwd: grad W_enc, b_enc (segment sum)", 2.0 * B * k * d, batch_rows + d * n * s + n * s,
               fma_peak, bw),
    ]
    if pre_bias:
        kernels.append(Kernel("pre_bias bwd: -W_enc @ grad b_enc (GEMV)", 2.0 * d * n, d * n * s + n * s, fma_peak, bw))
    if grad_x:
        kernels += [
            Kernel("encoder bwd: W_enc transposed copy", 0.0, 2 * n * d * s, fma_peak, bw),
            Kernel("encoder bwd: grad x (gathered W_enc columns)", 2.0 * B * k * d, codes + weight_rows + batch_rows,
                   fma_peak, bw),
        ]
    return kernels


def bf16_gemm_bound(B: int, d: int, n: int, card: str = "h100") -> float:
    """Seconds: the bf16 encoder GEMM alone (x, W_enc read, pre written once), issue 20's yardstick."""
    spec = CARDS[card]
    return Kernel("bf16 GEMM", 2.0 * B * d * n, 2 * (B * d + d * n + B * n), spec["bf16"], spec["hbm"]).seconds


ENCODER_PARTS = {"fused": 3, "fused rounds": 3, "unfused": 2, "screened": 5, "screened passes": 4}  # each design's encoder rows
STEP = "TopK step (encode+decode+MSE+backward)"
STEP_GRAD_X = "TopK step with grad x too (x requires grad: W_enc transposed copy + gathered columns)"
STEP_SAE = "TopK step of an SAE (b_dec subtracted before encoding: + x - b_dec, + a GEMV for its gradient)"
# bench/gpu.py's rows for the non-default designs (SPARSEKIT_GPU_TOPK=unfused or fused, screen off).
TOPK_UNFUSED = "topk_encode fwd, unfused (GEMM writes pre + radix select)"
TOPK_FUSED = "topk_encode fwd, fused (screen off)"
STEP_UNFUSED = "TopK step, unfused (GEMM writes pre + radix select)"
STEP_FUSED = "TopK step, fused (screen off)"
STEP_SCREEN_PASSES = "TopK step, bf16 screen through a written a (SPARSEKIT_GPU_SCREEN_SELECT=passes)"
TOPK_SCREEN_PASSES = "topk_encode fwd, bf16 screen through a written a (passes)"
TOPK_ROUNDS = "topk_encode fwd, fused, round-by-round epilogue (SPARSEKIT_GPU_TOPK_EPILOGUE=rounds)"
STEP_ROUNDS = "TopK step, fused, round-by-round epilogue (SPARSEKIT_GPU_TOPK_EPILOGUE=rounds)"


def _encoder_part(kernels: list[Kernel], encoder: str) -> list[Kernel]:
    return kernels[:ENCODER_PARTS[encoder]]


def _named(kernels: list[Kernel], *names: str) -> list[Kernel]:
    return [kern for kern in kernels if kern.name in names]


def prediction_rows(shapes, dtypes, card: str = "h100", measured: dict | None = None) -> list[dict]:
    """One dict per kernel of the default ("as built") step, per bench row a sum of them bounds, and
    per step design (as built, fused, unfused, screened): shape, dtype, name, GFLOP, int_gop (the
    CUDA cores' integer work), MB, bound_us (roofline: each kernel's busiest unit), limit, x_bf16_gemm
    (bound / the bf16 GEMM's bound), serial_us and serial_x (no kernel's integer work overlapping its
    FLOPs), and measured_us with measured_over_bound where ``measured`` ({(shape label, dtype, bench
    row name): seconds}) has it."""
    measured = measured or {}
    rows = []
    for B, d, n, k in shapes:
        label = f"B={B} d={d} n={n} k={k}"
        yardstick = bf16_gemm_bound(B, d, n, card)
        for dtype in dtypes:
            def add(name, kernels, bench_name=None, limit="sum"):
                seconds = sum(c.seconds for c in kernels)
                serial = sum(c.serial_seconds for c in kernels)
                got = measured.get((label, dtype, bench_name or name))
                rows.append(dict(shape=label, dtype=dtype, name=name, gflop=sum(c.flops for c in kernels) / 1e9,
                                 int_gop=sum(c.int_ops for c in kernels) / 1e9,
                                 mb=sum(c.bytes for c in kernels) / 1e6, bound_us=seconds * 1e6, limit=limit,
                                 x_bf16_gemm=seconds / yardstick, serial_us=serial * 1e6, serial_x=serial / yardstick,
                                 measured_us=got * 1e6 if got else None,
                                 measured_over_bound=got / seconds if got else None))

            default = default_encoder(d, n, k, B, dtype)
            designs = {encoder: step_kernels(B, d, n, k, dtype, card, encoder)
                       for encoder in ("fused", "unfused")
                       + (("screened", "screened passes") if dtype == "fp32" else ("fused rounds",))}
            built = designs[default]
            for kern in built:
                add(kern.name, [kern], limit=kern.limit)
            add("= topk_encode fwd", _encoder_part(built, default), "topk_encode fwd")
            add("= sparse_decode fwd", _named(built, "sparse decode"), "sparse_decode fwd")
            add("= sparse_decode fwd+bwd (deterministic)",
                _named(built, "sparse decode", "decode bwd: grad W_dec and grad values (sort + one pass by latent)"),
                "sparse_decode fwd+bwd (deterministic)")
            design = default
            if default == "screened":
                design = f"bf16 screen, {'measured' if screen_candidates(d, n, k)[1] else 'assumed'} candidates"
            add(f"= {STEP}, as built ({design})", built, STEP)
            add(f"= {STEP_GRAD_X}, as built", step_kernels(B, d, n, k, dtype, card, default, grad_x=True))
            add(f"= {STEP_SAE}, as built", step_kernels(B, d, n, k, dtype, card, default, pre_bias=True))
            if default != "fused":
                add(f"= {TOPK_FUSED}", _encoder_part(designs["fused"], "fused"), TOPK_FUSED)
                add(f"= {STEP_FUSED}", designs["fused"], STEP_FUSED)
            add(f"= {TOPK_UNFUSED}", _encoder_part(designs["unfused"], "unfused"), TOPK_UNFUSED)
            add(f"= {STEP_UNFUSED}", designs["unfused"], STEP_UNFUSED)
            if dtype == "fp32":
                if default != "screened":
                    add("= TopK step, fp32 through the bf16 screen", designs["screened"])
                add(f"= {TOPK_SCREEN_PASSES}", _encoder_part(designs["screened passes"], "screened passes"),
                    TOPK_SCREEN_PASSES)
                add(f"= {STEP_SCREEN_PASSES}", designs["screened passes"], STEP_SCREEN_PASSES)
            else:
                add(f"= {TOPK_ROUNDS}", _encoder_part(designs["fused rounds"], "fused rounds"), TOPK_ROUNDS)
                add(f"= {STEP_ROUNDS}", designs["fused rounds"], STEP_ROUNDS)
    return rows


def measured_seconds(report: dict) -> dict:
    """{(shape label, dtype, bench row name): seconds} from a bench/gpu.py JSON report."""
    return {(r["shape"], r["dtype"], r["name"]): r["seconds"] for r in report["rows"] if r.get("seconds")}


def table(rows: list[dict]) -> str:
    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}g}"

    header = ["kernel / bench row", "shape", "dtype", "GFLOP", "int Gop", "MB", "bound µs", "limit", "x bf16 GEMM",
              "serial µs", "serial x", "measured µs", "measured / bound"]
    lines = [header] + [[r["name"], r["shape"], r["dtype"], fmt(r["gflop"]), fmt(r["int_gop"]), fmt(r["mb"]),
                         fmt(r["bound_us"]), r["limit"], fmt(r["x_bf16_gemm"]), fmt(r["serial_us"]),
                         fmt(r["serial_x"]), fmt(r["measured_us"], 4), fmt(r["measured_over_bound"])]
                        for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def compiled_fused_kernel(value_f32: bool = False, target: str = "sm_90", results_dir: Path = RESULTS_DIR) -> dict | None:
    """The fused GEMM + top-k kernel (``fused_topk._gemm_topk_kernel``, bf16 operands) as compiled for
    ``target`` in the newest AOT compile report under ``results_dir`` (``make gpu-check`` or
    ``bench/aot_compile.py --quick --output auto`` write one): the bf16 TopK's variant (packed keys
    restored), or the fp32 screen's (``value_f32``), at its default tile where the report has it.
    Returns report, config, registers, shared_kb, num_warps and blocks_per_sm, or None."""
    import torch
    from aot_compile import blocks_per_sm

    from sparsekit.kernels.fused_topk import _HOPPER, GPU_BLOCK_K

    default = dict(_HOPPER[torch.bfloat16], BLOCK_K=GPU_BLOCK_K[torch.bfloat16])
    for path in sorted(results_dir.glob("*-aot-compile*.json"), reverse=True):
        try:
            results = json.loads(path.read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found = []
        for r in results:
            v = r.get("variant", {})
            flags = dict(v.get("constexprs", []))
            if (v.get("kernel") != "fused_topk._gemm_topk_kernel" or r.get("target") != target or r.get("error")
                    or r.get("registers") is None or not flags.get("PACK") or bool(flags.get("VALUE_F32")) != value_f32
                    or not any(t == "*bf16" for _, t in v.get("signature", []))):
                continue
            is_default = all(flags.get(name) == default[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) and \
                v.get("num_warps") == default["num_warps"] and v.get("num_stages") == default["num_stages"]
            found.append((not is_default, r, v, flags))
        if found:
            _, r, v, flags = min(found, key=lambda item: item[0])
            config = " ".join(f"{name}={flags[name]}" for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + \
                f" w{v['num_warps']} s{v['num_stages']}"
            return dict(report=path.name, config=config, registers=r["registers"],
                        shared_kb=r["shared_bytes"] / 1024, num_warps=v["num_warps"],
                        blocks_per_sm=blocks_per_sm(r["registers"], v["num_warps"], r["shared_bytes"], target))
    return None


def occupancy_note(results_dir: Path = RESULTS_DIR) -> str:
    """What the compiled fused kernels say about the bound column's overlap, one line each."""
    lines = []
    for value_f32, what in ((False, "bf16 TopK"), (True, "fp32 screen")):
        got = compiled_fused_kernel(value_f32, "sm_90", results_dir)
        if got is None:
            lines.append(f"The fused GEMM + top-k kernel ({what}): no AOT compile report under {results_dir} has it "
                         "(run `make gpu-check`): whether its epilogue can overlap other blocks' MMAs is unchecked.")
            continue
        verdict = ("its epilogue (integer rounds) can run while another block's MMAs do: the bound column"
                   if got["blocks_per_sm"] >= 2 else
                   "one block per SM: its epilogue cannot overlap another block's MMAs; read the serial column")
        lines.append(f"The fused GEMM + top-k kernel ({what}) compiled for sm_90 ({got['report']}; {got['config']}): "
                     f"{got['registers']} registers x {32 * got['num_warps']} threads, {got['shared_kb']:.0f} KB shared "
                     f"-> {got['blocks_per_sm']} blocks per SM; {verdict}.")
    return "\n".join(lines)
