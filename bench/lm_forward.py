"""The language model's side of a run, against what the CPU allows: tokens/s of SmolLM2-135M's forward
pass, of activation caching and of CE/KL evaluation, each beside the FLOP-bound rate measured in the
same run; and the opt-in bfloat16 model's speed and its drift in CE and FVU against float32.

    .venv/bin/python bench/lm_forward.py [--rounds 3] [--output auto]     # make bench-lm

The bound: the model's FLOPs per token (every matrix product: 2 x the parameters of each linear map
and of the unembedding, plus the attention scores and mixing at the context length; norms, rotary
and softmax not counted) divided into the CPU's dense GEMM rate, measured here on a 2048^3 ``torch.mm``
in the same dtype (the rate a large, well-shaped product reaches: the model's own [tokens, 576] x
[576, 1536] products may run below it, which counts against the share reported). Caching runs the
blocks up to the hook only (``stop_at_layer``); evaluation runs one clean pass plus, per hook, a
zero-ablated pass and one spliced pass per dictionary, each restarting at the hook's block: their
bounds count exactly those FLOPs. Drift: one TopK SAE trained on float32 activations, evaluated with
the float32 model and with the bfloat16 one on the same held-out tokens.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_model, output_path, pin_thread_env, time_with_cpu_share  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    p.add_argument("--batch-contexts", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--eval-contexts", type=int, default=16, help="contexts per timed evaluation")
    p.add_argument("--layer", type=int, default=3, help="the hook's block: blocks.L.hook_mlp_out")
    p.add_argument("--train-tokens", type=int, default=100_000, help="tokens the drift SAE trains on")
    p.add_argument("--drift-tokens", type=int, default=8192, help="held-out tokens of the drift evaluation")
    p.add_argument("--output", default=None, help="markdown file for the table ('auto': bench/results/<date>-<cpu>-lm.md)")
    return p.parse_args(argv)


def linear_flops_per_token(cfg) -> tuple[float, float]:
    """(FLOPs per token of one block's linear maps, of the unembedding): 2 x multiply-adds."""
    kv = cfg.n_key_value_heads or cfg.n_heads
    attention = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * kv)  # W_Q, W_O; W_K, W_V
    mlp = cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    return 2.0 * (attention + mlp), 2.0 * cfg.d_model * cfg.d_vocab


def block_flops_per_token(cfg, context_len: int) -> float:
    """One block: its linear maps plus scores (q.k) and mixing (pattern.v) over the whole context."""
    per_block, _ = linear_flops_per_token(cfg)
    return per_block + 2.0 * 2 * cfg.n_heads * cfg.d_head * context_len


def flops_per_token(cfg, context_len: int, first_block: int = 0, last_block: int | None = None,
                    unembed: bool = True) -> float:
    """Blocks first_block..last_block (inclusive; default all) and, if ``unembed``, the unembedding."""
    last = cfg.n_layers - 1 if last_block is None else last_block
    return (last - first_block + 1) * block_flops_per_token(cfg, context_len) + \
        (linear_flops_per_token(cfg)[1] if unembed else 0.0)


def gemm_rate(torch, dtype, size: int = 2048, rounds: int = 3) -> float:
    """The best of ``rounds`` 2048^3 torch.mm rates in FLOP/s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2.0 * size ** 3 / (time.perf_counter() - started))
    return best


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv=None) -> None:
    args = parse(argv)
    pin_thread_env(args.threads)
    import torch

    from sparsekit import TopKSAE
    from sparsekit.activations.lm import load_lm
    from sparsekit.activations.store import corpus_contexts, hook_activations
    from sparsekit.analysis.lm_metrics import Splice, evaluate_splices
    from sparsekit.ops.cpu.screen import cpu_has_native_bf16
    from sparsekit.training.loop import TrainConfig, train

    torch.set_num_threads(args.threads)
    load_before = load_average()
    model = load_lm()
    cfg, T, L = model.cfg, args.context_len, args.layer
    hook = f"blocks.{L}.hook_mlp_out"
    n_train = -(-args.train_tokens // (T - 1))
    n_drift = -(-args.drift_tokens // (T - 1))
    contexts = corpus_contexts(model, "shakespeare", T, max_contexts=n_train + n_drift)
    train_contexts, drift_contexts = contexts[:n_train], contexts[n_train:]
    batch = drift_contexts[:args.batch_contexts]
    eval_batch = drift_contexts[:args.eval_contexts]

    # The drift SAE, trained on float32 activations (also the dictionary the timed evaluation splices in).
    acts = torch.cat([hook_activations(model, train_contexts[i:i + 16], [hook], stop_at_layer=L + 1)[0]
                      for i in range(0, n_train, 16)])
    sae = TopKSAE(cfg.d_model, 2048, 32)
    train(sae, acts, TrainConfig(batch_size=1024, total_tokens=acts.shape[0] // 1024 * 1024, lr=1e-3, eval_tokens=0,
                                 log_every=10**9, progress=False))
    splices = {"sae": Splice(sae, hook)}

    dtypes = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    rows, drift = [], {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model.to(dtype)
        rate = gemm_rate(torch, dtype)

        @torch.no_grad()
        def forward():
            model(batch)

        @torch.no_grad()
        def caching():
            hook_activations(model, batch, [hook], stop_at_layer=L + 1)

        def evaluation():
            evaluate_splices(model, eval_batch, splices, batch_contexts=args.batch_contexts)

        times, busy = time_with_cpu_share({"forward": forward, "caching": caching, "evaluation": evaluation},
                                          args.rounds)
        full = flops_per_token(cfg, T)
        per_path = {
            "forward (full model)": (times["forward"], batch.numel(), full),
            f"caching (blocks 0..{L})": (times["caching"], batch.numel(), flops_per_token(cfg, T, 0, L, unembed=False)),
            "evaluation (clean + zero + splice)": (times["evaluation"], eval_batch.numel(),
                                                   full + 2 * flops_per_token(cfg, T, first_block=L)),
        }
        for path, (seconds, tokens, flops) in per_path.items():
            median = statistics.median(seconds)
            tok_s, bound = tokens / median, rate / flops
            rows.append([path, dtype_name, f"{tok_s:,.0f}", f"{flops / 1e9:.3f}", f"{tok_s * flops / 1e9:.0f}",
                         f"{rate / 1e9:.0f}", f"{bound:,.0f}", f"{tok_s / bound:.0%}", f"{busy:.0%}"])
        drift[dtype_name] = evaluate_splices(model, drift_contexts, splices, batch_contexts=args.batch_contexts)["sae"]
    model.to(torch.float32)

    header = ["path", "model dtype", "tokens/s", "GFLOP/token", "achieved GFLOP/s", "GEMM GFLOP/s (2048^3)",
              "bound tokens/s", "share of bound", "CPU taken by others"]
    lines = [f"# bench/lm_forward.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}",
             "",
             f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, native bf16: {cpu_has_native_bf16()}; "
             f"load average before: {load_before}, after: {load_average()}; torch {torch.__version__}",
             f"SmolLM2-135M-Instruct, contexts of {T} tokens, {args.batch_contexts} contexts per pass, hook {hook}, "
             f"{args.rounds} interleaved rounds (medians)", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if len(drift) > 1:
        base, other = drift["float32"], drift["bfloat16"]
        lines += ["", f"Drift of the bfloat16 model against float32 (one TopK SAE, n=2048, k=32, trained on "
                      f"{acts.shape[0]:,} float32 activations; {base['tokens']:,} held-out tokens):", "",
                  "| metric | float32 model | bfloat16 model | difference |", "| --- | ---: | ---: | ---: |"]
        for key in ("ce_clean", "ce_splice", "ce_zero", "ce_recovered", "kl", "fvu", "l0"):
            lines.append(f"| {key} | {base[key]:.4f} | {other[key]:.4f} | {other[key] - base[key]:+.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        path = output_path(args.output, datetime.datetime.now(), "-lm")
        path.write_text(text)
        print(f"written to {path}")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
