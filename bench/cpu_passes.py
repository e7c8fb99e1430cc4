"""The CPU TopK step's passes, each timed alone, against memory bandwidth measured in the same run
(issue 25: "find where the four sparse passes lose against memory bandwidth").

    .venv/bin/python bench/cpu_passes.py                 # B=4096, d=512, n=16384, k=32, float32
    .venv/bin/python bench/cpu_passes.py --quick         # small shapes, for iteration
    .venv/bin/python bench/cpu_passes.py --profile 8     # also torch.profiler's view of 8 TopK steps
    make bench-peers                                     # bench/peers.py prints the same table

Each row is one pass of ``sparsekit.train``'s TopK step (the SAE's encoder of x - b_dec, sparse
decode, MSE, backward, decoder-gradient projection, clipping, Adam, renormalisation), run alone on
that step's tensors through the custom op (``sparsekit.ops.cpu``) or the torch call the step makes:

- the encoder forward as it runs on this CPU: with the bf16 screen (``sparsekit.ops.cpu.screen``)
  three passes -- packing the operands, the bf16 GEMM in row blocks, and the selection after it
  (bound, candidates, float32 recompute, top-k); without it the float32 GEMM with the selection
  fused into its tiles, one row;
- the four sparse passes: the decode (``sparse_decode_cpu``), the decode backward's grad values
  (``sampled_dense_dot_cpu``) and grad W_dec (``coo_t_times_dense_cpu``) each alone and both
  fused as the step runs them (``sparse_decode_backward_cpu``), and the encoder backward's grad
  W_enc / b_enc (``coo_t_times_dense_cpu``, transposed output);
- a reference beside them, not part of the step: the decode's gathers through torch's
  ``F.embedding_bag`` (this machine's rate for the same row gathers in another library's kernel);
- the optimizer's passes: the decoder-gradient projection, ``clip_grad_norm_``, the trainer's
  fused Adam, the decoder renormalisation.

For each: the bytes the pass must move at minimum (its formula: every input read once, every
output written once, a gathered row counted at each gather; int64 indices), the median time, the
achieved GB/s, and that as a share of two streaming rates timed in the same interleaved rounds: a
torch ``copy_`` between two buffers larger than the L3 cache (bytes read + bytes written) and a
read-only ``sum`` over one of them. A share above 1 means the pass found its data in cache (the
gathers reuse rows). The last column is the pass's floor if every array it gathers from came from
memory once (the rest from cache) at the copy rate: how far a reordered or fused pass could go.
Each timed call repeats a short pass until it lasts ~30 ms; medians of interleaved rounds
(bench/_timing.py), the share of the CPU other processes took meanwhile beside.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_shape_arguments, pin_thread_env, time_with_cpu_share  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, or 3 with --quick)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for torch, OpenBLAS and sparsekit._C (default 2)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also run STEPS TopK training steps under torch.profiler and print its top ops")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    for name in ("rounds", "threads", "batch", "d_in", "n_latents", "k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.profile < 0:
        parser.error(f"--profile must be >= 0, got {args.profile}")
    return args


if __name__ == "__main__":
    pin_thread_env(parse_args().threads)  # before torch, numpy's OpenBLAS and sparsekit._C load

import torch  # noqa: E402
from step_table import Shapes, environment_lines, pin_threads, shapes_from  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.ops.autograd import kept_rows  # noqa: E402
from sparsekit.ops.backend import _C  # noqa: E402
from sparsekit.ops.cpu import decode as cpu_decode  # noqa: E402
from sparsekit.ops.cpu import encode as cpu_encode  # noqa: E402
from sparsekit.ops.cpu import screen as cpu_screen  # noqa: E402
from sparsekit.ops.cpu import sparse as cpu_sparse  # noqa: E402
from sparsekit.training.optimizer import adam  # noqa: E402

# A timed call repeats a pass until it lasts about this long: a pass of a few ms alone is too
# short for the clock and the scheduler.
CALL_SECONDS = 0.03
# The streaming buffers: this many times the L3 cache, and at least STREAM_MIN_BYTES.
STREAM_L3_MULTIPLE = 4
STREAM_MIN_BYTES = 128 * 2**20


@dataclass
class Pass:
    """One timed pass: a row of the table. ``terms`` are (expression in B, d, n, k, C, P, R, S,
    what it counts) and sum to the minimum bytes; a gathered term carries a third expression, the
    size of the array it gathers from (its bytes when each row came from memory once). ``fn`` runs
    the pass once."""
    name: str
    label: str
    op: str
    terms: tuple[tuple[str, ...], ...]
    fn: Callable[[], object]
    # "pass"; "compute" (bound by FLOP, not bytes); "stream" (a reference rate); "reference" (not in the step)
    kind: str = "pass"

    def formula(self) -> str:
        return " + ".join(f"{term[0]} {term[1]}" + (f" ({term[2]} once)" if len(term) > 2 else "")
                          for term in self.terms)

    def bytes(self, sizes: dict[str, int], once: bool = False) -> int:
        """The minimum bytes; with ``once``, each gathered array counted once instead of per gather."""
        # The expressions are this module's own constants over the names in sizes.
        return sum(int(eval(term[2] if once and len(term) > 2 else term[0], {"__builtins__": {}}, sizes))
                   for term in self.terms)


@dataclass
class PassResults:
    shapes: Shapes
    passes: list[Pass]
    sizes: dict[str, int]  # the values of the formulas' names
    seconds: dict[str, float]  # median seconds of one run of each pass
    spread: dict[str, tuple[float, float]]
    repeats: dict[str, int]
    rounds: int
    others_share: float
    load_before: float
    screened: bool
    fresh_peak: float  # GFLOP/s, fresh_process_fma_peak()

    def rate(self, name: str) -> float:
        """GB/s of a pass (1e9 bytes)."""
        p = next(p for p in self.passes if p.name == name)
        return p.bytes(self.sizes) / self.seconds[name] / 1e9


def l3_bytes() -> int:
    """The largest cache this CPU reports (sysfs), or 32 MiB when it reports none."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        largest = max(largest, value)
    return largest or 32 * 2**20


def _repeated(fn: Callable[[], object], seconds: float = CALL_SECONDS) -> tuple[Callable[[], None], int]:
    """A call running fn r times, r chosen so that the call lasts about ``seconds``; and r."""
    fn()  # warm-up: buffers, caches, first-call dispatch
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    repeats = max(1, round(seconds / max(once, 1e-7)))

    def run() -> None:
        for _ in range(repeats):
            fn()

    return run, repeats


# --- the step's tensors and its passes ----------------------------------------------------------

def step_tensors(shapes: Shapes) -> dict:
    """A fresh TopK SAE as the trainer builds it, the bench's x (torch.randn, seed 0), its codes and
    what the backward passes receive: grad_y [B, d] = d mse / d x_hat, the kept entries' gradient
    [B*k] (ReLU mask applied), the codes as COO (rows, cols [B*k]), x - b_dec [B, d]."""
    from step_table import make_inputs
    x = make_inputs(shapes)[0]
    sae = sparsekit.TopKSAE(shapes.d, shapes.n, shapes.k)
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    values, indices = codes.values.contiguous(), codes.indices.contiguous()
    grad_y = (2.0 / shapes.batch) * (x_hat - x)  # the gradient of mean_b ||x_hat - x||^2
    grad_values = cpu_sparse.sampled_dense_dot_cpu(kept_rows(shapes.batch, shapes.k), indices.reshape(-1), grad_y,
                                                   sae.W_dec.detach())
    return {"x": x, "sae": sae, "values": values.reshape(-1), "rows": kept_rows(shapes.batch, shapes.k),
            "cols": indices.reshape(-1), "grad_y": grad_y.contiguous(),
            "grad_kept": (grad_values * (values.reshape(-1) > 0)).contiguous(),
            "centered": (x - sae.b_dec.detach()).contiguous()}


def encoder_passes(t: dict, shapes: Shapes) -> tuple[list[Pass], dict[str, int], bool]:
    """The encoder forward's passes as they run on this CPU, the candidate count C of the screen
    (0 without it), and whether the screen runs."""
    W_enc, b_enc = t["sae"].W_enc.detach(), t["sae"].b_enc.detach()
    xc = t["centered"]
    screened = cpu_screen.use_screen(xc, W_enc, shapes.k)
    if not screened:
        b_folded = (b_enc - t["sae"].b_dec.detach() @ W_enc).contiguous()
        return [Pass("encode_f32", "encoder forward: float32 GEMM in tiles, top-k fused into each tile",
                     "encode._topk_encode_float32", (("2*B*d*n", "FLOP, not bytes (compute-bound)"),),
                     lambda: cpu_encode._topk_encode_float32(t["x"], W_enc, b_folded, shapes.k), "compute")], {"C": 0}, False
    x_bf16, W_bf16, W_t, norms = cpu_screen._prepare(xc, W_enc)
    block = cpu_screen.tuning.chosen("screen_rows")
    Q_all = torch.empty(shapes.batch, shapes.n, dtype=torch.int16)
    torch.mm(x_bf16, W_bf16, out=Q_all.view(torch.bfloat16))
    values = torch.empty(shapes.batch, shapes.k)
    indices = torch.empty(shapes.batch, shapes.k, dtype=torch.int64)
    candidates = [0]

    def select() -> None:
        found = 0
        for start in range(0, shapes.batch, block):
            stop = min(shapes.batch, start + block)
            found += _C.topk_screened(Q_all[start:stop].numpy(), b_enc.numpy(), xc[start:stop].numpy(), W_t.numpy(),
                                      norms[0].numpy(), norms[1].numpy(), shapes.k, values[start:stop].numpy(),
                                      indices[start:stop].numpy())
        candidates[0] = found

    select()
    blocks = math.ceil(shapes.batch / block)
    return [
        Pass("pack", "screen: operands packed (W_enc to bf16, W_enc^T, column norms; x - b_dec to bf16)",
             "screen._prepare", (("d*n*4", "W_enc read"), ("d*n*2", "bf16 W_enc"), ("n*d*4", "W_enc^T"),
                                 ("B*d*4", "x read"), ("B*d*2", "bf16 x written")),
             lambda: cpu_screen._prepare(xc, W_enc)),
        Pass("gemm_bf16", f"screen: bf16 encoder GEMM, {blocks} row blocks of {block} (oneDNN)",
             "torch.mm per block", (("2*B*d*n", "FLOP, not bytes (compute-bound)"),),
             lambda: [None for _ in cpu_screen._bf16_gemm_blocks(x_bf16, W_bf16)], "compute"),
        Pass("select", "selection after the GEMM: bf16 bound, candidates, float32 recompute, top-k",
             "_C.topk_screened per block", (("B*n*2", "bf16 pre-activations read"), ("C*d*4", "W_enc^T rows gathered", "n*d*4"),
                                            ("B*d*4", "x read"), ("B*k*12", "codes written")),
             select),
    ], {"C": candidates[0]}, True


def sparse_passes(t: dict, shapes: Shapes) -> list[Pass]:
    """The four sparse passes (and the fused decode backward the step runs) on the step's codes."""
    W_dec, b_dec = t["sae"].W_dec.detach(), t["sae"].b_dec.detach()
    values, rows, cols, grad_y = t["values"], t["rows"], t["cols"], t["grad_y"]
    return [
        Pass("decode", "sparse decode: y = codes @ W_dec + b_dec", "sparse_decode_cpu",
             (("B*k*d*4", "W_dec rows gathered", "n*d*4"), ("B*k*12", "codes read"), ("B*d*4", "y written")),
             lambda: cpu_decode.sparse_decode_cpu(values, rows, cols, W_dec, b_dec, shapes.batch)),
        Pass("decode_grad_values", "decode backward, grad values alone: grad_y[b] . W_dec[j]",
             "sampled_dense_dot_cpu", (("B*k*d*4", "W_dec rows gathered", "n*d*4"), ("B*d*4", "grad_y read"),
                                       ("B*k*8", "indices read"), ("B*k*4", "grad values written")),
             lambda: cpu_sparse.sampled_dense_dot_cpu(rows, cols, grad_y, W_dec)),
        Pass("decode_grad_W_dec", "decode backward, grad W_dec alone: codes^T @ grad_y", "coo_t_times_dense_cpu",
             (("B*k*d*4", "grad_y rows gathered", "B*d*4"), ("B*k*12", "codes read"),
              ("n*d*4", "grad W_dec written")),
             lambda: cpu_sparse.coo_t_times_dense_cpu(values, rows, cols, grad_y, shapes.n, False)),
        Pass("decode_backward", "decode backward as the step runs it: both gradients, one pass over the latents",
             "sparse_decode_backward_cpu", (("B*k*d*4", "grad_y rows gathered", "B*d*4"), ("n*d*4", "W_dec read"),
                                            ("B*k*12", "codes read"), ("B*k*4", "grad values written"),
                                            ("n*d*4", "grad W_dec written")),
             lambda: cpu_decode.sparse_decode_backward_cpu(values, rows, cols, grad_y, W_dec)),
        Pass("encoder_grad_W_enc", "encoder backward: grad W_enc = (x - b_dec)^T S, grad b_enc = S^T 1",
             "coo_t_times_dense_cpu, transposed out", (("B*k*d*4", "x - b_dec rows gathered", "B*d*4"),
                                                       ("B*k*12", "kept gradients read"),
                                                       ("d*n*4", "grad W_enc written"), ("n*4", "grad b_enc")),
             lambda: cpu_sparse.coo_t_times_dense_cpu(t["grad_kept"], rows, cols, t["centered"], shapes.n, True)),
    ]


def optimizer_passes(t: dict, shapes: Shapes) -> list[Pass]:
    """The passes after backward over the parameters (P elements in all, R = n*d decoder)."""
    sae = t["sae"]
    params = list(sae.parameters())
    generator = torch.Generator().manual_seed(2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    cfg = sparsekit.TrainConfig(batch_size=shapes.batch, total_tokens=shapes.batch * 10**6, eval_tokens=0,
                                progress=False)
    optimizer = adam(sae, cfg)
    return [
        Pass("remove_parallel", "decoder gradient: component along each row removed", "ops.remove_parallel_rows_",
             (("R*4", "W_dec read"), ("2*R*4", "grad W_dec read and written")),
             lambda: sparsekit.ops.remove_parallel_rows_(sae.W_dec.grad, sae.W_dec)),
        Pass("clip", "clip_grad_norm_(1.0): the norm, then every gradient scaled",
             "torch.nn.utils.clip_grad_norm_", (("P*4", "gradients read (norm)"),
                                                ("2*P*4", "gradients read and written (scale)")),
             lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),
        Pass("adam", "Adam step (torch's fused kernel, as the trainer builds it)", "torch.optim.Adam(fused=True)",
             (("4*P*4", "parameters, gradients, both moments read"), ("3*P*4", "parameters, moments written")),
             optimizer.step),
        Pass("normalize", "decoder rows renormalised", "ops.normalize_rows_", (("2*R*4", "W_dec read and written"),),
             lambda: sparsekit.ops.normalize_rows_(sae.W_dec)),
    ]


def stream_passes() -> tuple[list[Pass], int]:
    """The two reference rates, and the buffer size S in bytes."""
    size = max(STREAM_L3_MULTIPLE * l3_bytes(), STREAM_MIN_BYTES)
    src = torch.ones(size // 4)
    dst = torch.empty_like(src)
    return [
        Pass("stream_copy", "streaming copy: dst.copy_(src), buffers beyond the L3 cache", "torch copy_",
             (("S", "read"), ("S", "written")), lambda: dst.copy_(src), "stream"),
        Pass("stream_read", "streaming read: src.sum()", "torch sum", (("S", "read"),), src.sum, "stream"),
    ], size


# Rounds of the FMA-peak kernel per call: ~2.5 ms on one AVX2 core at 2.5 GHz (12 FMAs a round).
PEAK_ROUNDS = 2**20


def fma_peak_pass() -> tuple[Pass, int]:
    """This CPU's float32 multiply-add rate on every thread (csrc/fma_peak.hpp: register-only
    vector FMAs), the roof any float32 GEMM runs under; and the FLOPs of one call (F)."""
    flops = int(_C.fma_peak_flops(PEAK_ROUNDS)[0])
    return Pass("fma_peak", "reference: float32 FMA peak, register-only vector FMAs on every thread",
                "_C.fma_peak_flops", (("F", "FLOP, not bytes (no memory traffic)"),),
                lambda: _C.fma_peak_flops(PEAK_ROUNDS), "peak"), flops


def fresh_process_fma_peak() -> float:
    """The FMA peak (GFLOP/s, best of 5 calls) in a new process that has run nothing else: inside the
    bench, a BLAS's worker threads still spinning after its last GEMM can take half the cores (2-core
    AVX2 EPYC: 202 GFLOP/s fresh, 101 right after a 2-thread OpenBLAS GEMM)."""
    import subprocess
    code = ("import time\nfrom sparsekit.ops.backend import _C\nbest = 0.0\n"
            f"for _ in range(6):\n    s = time.perf_counter(); f, _ = _C.fma_peak_flops({PEAK_ROUNDS})\n"
            "    best = max(best, f / (time.perf_counter() - s) / 1e9)\nprint(best)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def gather_reference(t: dict, shapes: Shapes) -> Pass:
    """The decode's gathers done by torch (F.embedding_bag, weighted sum): this machine's rate for
    the same B*k row gathers from W_dec through another library's kernel, beside the decode's."""
    W_dec = t["sae"].W_dec.detach()
    indices, values = t["cols"].view(shapes.batch, shapes.k), t["values"].view(shapes.batch, shapes.k)
    return Pass("gather_torch", "reference: the decode's gathers by torch, F.embedding_bag(mode='sum')",
                "torch.nn.functional.embedding_bag",
                (("B*k*d*4", "W_dec rows gathered", "n*d*4"), ("B*k*12", "codes read"), ("B*d*4", "y written")),
                lambda: torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum"),
                "reference")


def measure_passes(shapes: Shapes, rounds: int) -> PassResults:
    """Every pass and both streaming rates, each timed in ``rounds`` interleaved rounds."""
    load_before = os.getloadavg()[0]
    t = step_tensors(shapes)
    encoder, extra, screened = encoder_passes(t, shapes)
    streams, stream_size = stream_passes()
    peak, peak_flops = fma_peak_pass()
    passes = (streams + [peak] + encoder + sparse_passes(t, shapes) + [gather_reference(t, shapes)]
              + optimizer_passes(t, shapes))
    sizes = {"B": shapes.batch, "d": shapes.d, "n": shapes.n, "k": shapes.k, "S": stream_size, "F": peak_flops,
             "R": shapes.n * shapes.d, "P": sum(p.numel() for p in t["sae"].parameters()), **extra}
    fns, repeats = {}, {}
    for p in passes:
        fns[p.name], repeats[p.name] = _repeated(p.fn)
    print(f"timing {len(fns)} passes x {rounds} rounds ...", file=sys.stderr)
    times, others_share = time_with_cpu_share(fns, rounds)
    per_run = {name: [s / repeats[name] for s in ts] for name, ts in times.items()}
    return PassResults(shapes=shapes, passes=passes, sizes=sizes,
                       seconds={name: statistics.median(ts) for name, ts in per_run.items()},
                       spread={name: (min(ts), max(ts)) for name, ts in per_run.items()}, repeats=repeats,
                       rounds=rounds, others_share=others_share, load_before=load_before, screened=screened,
                       fresh_peak=fresh_process_fma_peak())


# --- reporting ----------------------------------------------------------------------------------

PASS_TABLE_HEADER = ("| pass | op timed | minimum bytes (formula) | MB | median ms | min-max ms | GB/s "
                     "| x copy rate | x read rate | ms at copy rate, each array once |")


def pass_table_lines(r: PassResults) -> list[str]:
    """The Markdown table, one row per pass, the streaming rates first."""
    copy_rate, read_rate = r.rate("stream_copy"), r.rate("stream_read")
    lines = [PASS_TABLE_HEADER, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in r.passes:
        seconds, (low, high) = r.seconds[p.name], r.spread[p.name]
        timing = f"{seconds * 1e3:.2f} | {low * 1e3:.2f}-{high * 1e3:.2f}"
        if p.kind in ("compute", "peak"):
            gflop = p.bytes(r.sizes) / 1e9
            lines.append(f"| {p.label} | `{p.op}` | {p.formula()} | | {timing} | {gflop / seconds:.0f} GFLOP/s | | | |")
            continue
        megabytes, rate = p.bytes(r.sizes) / 1e6, r.rate(p.name)
        floor = p.bytes(r.sizes, once=True) / (copy_rate * 1e9)
        lines.append(f"| {p.label} | `{p.op}` | {p.formula()} | {megabytes:.1f} | {timing} | {rate:.1f} "
                     f"| {rate / copy_rate:.2f} | {rate / read_rate:.2f} | {floor * 1e3:.2f} |")
    return lines


def summary_lines(r: PassResults, step_seconds: float | None = None) -> list[str]:
    """What the table's names stand for, the streaming rates, and the passes' sum beside the step."""
    s = r.sizes
    lines = [f"Names: B={s['B']}, d={s['d']}, n={s['n']}, k={s['k']}; "
             + (f"C = {s['C']} candidates the screen recomputed ({s['C'] / s['B']:.1f} per row); " if r.screened else "")
             + f"P = {s['P']} parameters, R = n*d = {s['R']} decoder entries; S = {s['S'] / 2**20:.0f} MiB streaming "
             f"buffer ({STREAM_L3_MULTIPLE}x the {l3_bytes() / 2**20:.0f} MiB cache, at least "
             f"{STREAM_MIN_BYTES / 2**20:.0f} MiB); 4 bytes a float32, 2 a bf16, 12 a code (value + int64 index).",
             f"Streaming rates of this run: copy {r.rate('stream_copy'):.1f} GB/s (read + write), read "
             f"{r.rate('stream_read'):.1f} GB/s; {r.rounds} interleaved rounds, medians; each timed call repeats a "
             f"pass to ~{CALL_SECONDS * 1e3:.0f} ms (ms above are per pass)."]
    in_run = r.sizes["F"] / r.seconds["fma_peak"] / 1e9
    peak = max(r.fresh_peak, in_run)
    gemm_flop = 2 * s["B"] * s["d"] * s["n"]
    lines.append(f"float32 FMA peak in a fresh process: {r.fresh_peak:.0f} GFLOP/s on {_C.get_num_threads()} threads "
                 f"({in_run:.0f} in this run, its row above, timed among the other passes, where threads another "
                 f"library leaves spinning can take cores; register-only vector FMAs, {_C.isa} build); a float32 "
                 f"encoder GEMM (2*B*d*n = {gemm_flop / 1e9:.1f} GFLOP) needs at least {gemm_flop / peak / 1e6:.0f} ms "
                 f"at the higher rate.")
    if not r.screened:
        lines.append("No bf16 screen at these shapes on this CPU (screen.use_screen): the selection runs fused into "
                     "the float32 GEMM's tiles and is not timed apart.")
    step_names = [p.name for p in r.passes if p.kind in ("pass", "compute")
                  and p.name not in ("decode_grad_values", "decode_grad_W_dec")]
    total = sum(r.seconds[name] for name in step_names)
    sparse = sum(r.seconds[name] for name in ("decode", "decode_backward", "encoder_grad_W_enc"))
    line = (f"Sum of the passes the step runs ({', '.join(step_names)}): {total * 1e3:.1f} ms, of which the "
            f"sparse passes (decode, decode backward, encoder backward) {sparse * 1e3:.1f} ms")
    if step_seconds and step_seconds > total:
        line += (f"; the TopK step's median in the main table: {step_seconds * 1e3:.1f} ms, so "
                 f"{(step_seconds - total) * 1e3:.1f} ms ({1 - total / step_seconds:.0%}) goes to what no row times "
                 f"(elementwise work, loss, checks, fire counts, Python)")
    elif step_seconds:
        line += (f"; more than the TopK step's median in the main table ({step_seconds * 1e3:.1f} ms): alone the "
                 f"passes ran slower than inside the step, or the machine was busy")
    return lines + [line + "."]


def section_lines(r: PassResults, step_seconds: float | None = None, machine_line: bool = True) -> list[str]:
    """The section bench/peers.py appends after its main table: the machine kind (unless
    ``machine_line`` is False: the header above gave it) and the load while the passes were timed,
    the table and its summary."""
    from step_table import BUSY_SHARE, cpu_paths_line
    return ["", "## The TopK step's passes against memory bandwidth (bench/cpu_passes.py)", "",
            f"- shapes: {r.shapes}; each pass alone on the step's tensors (module docstring)",
            *([cpu_paths_line()] if machine_line else []),
            f"- other processes used {r.others_share:.0%} of the CPU while the passes were timed (load average "
            f"before: {r.load_before:.2f})"
            + (" -- WARNING: the machine was not quiet; the numbers are suspect" if r.others_share > BUSY_SHARE
               else ""),
            "", *pass_table_lines(r), "", *summary_lines(r, step_seconds)]


def profile_lines(shapes: Shapes, steps: int, rows: int = 25) -> list[str]:
    """torch.profiler over ``steps`` TopK training steps (bench/peers.py's TrainerStep, after two
    warm-up steps): the ops with the most self time, per step. The C++ kernels called inside a
    custom op count as that op's self time; a custom op with autograd shows its forward as
    ``GeneratedBackwardFor_<op>_default`` (torch's wrapper) and its backward with ``Backward`` after."""
    from peers import TrainerStep
    from torch.profiler import ProfilerActivity, profile
    step = TrainerStep("topk", shapes)
    step()
    step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["", f"## torch.profiler: {steps} sparsekit TopK steps ({shapes}), ops by self time", "",
             f"Wall time per step under the profiler: {wall * 1e3:.1f} ms; self time recorded per step: "
             f"{total / steps / 1e3:.1f} ms.", "",
             "| op | calls per step | self ms per step | share |", "| --- | ---: | ---: | ---: |"]
    for e in events[:rows]:
        lines.append(f"| `{e.key}` | {e.count / steps:g} | {e.self_cpu_time_total / steps / 1e3:.1f} "
                     f"| {e.self_cpu_time_total / total:.1%} |")
    return lines


def main() -> None:
    args = parse_args()
    shapes = shapes_from(args)
    pin_threads(args.threads)
    now = datetime.datetime.now().astimezone()
    results = measure_passes(shapes, args.rounds)
    lines = [f"# sparsekit CPU TopK step, pass by pass ({now:%Y-%m-%d %H:%M %Z})", "",
             *environment_lines(shapes, args.threads, args.rounds, results.load_before, results.others_share),
             *section_lines(results, machine_line=False)]
    if args.profile:
        lines += profile_lines(shapes, args.profile)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
