"""Sparse-regularised base models: 1-layer character-level transformers with an L1 penalty on the MLP.

The model is a TransformerLens ``HookedTransformer`` (imported lazily): one block (attention, then a
ReLU MLP), LayerNorm before each and before the unembedding, learned positional embeddings. Tokens
are characters of the shipped Shakespeare text (``sparsekit.activations.text``): every character
seen at least ``min_char_count`` times in the corpus gets an id, the rest share UNK; BOS starts each
context. Training minimises, per batch of contexts [B, n_ctx],

    loss = CE(next token) + l1 * mean_{b, t} sum_i post[b, t, i]

where post = ``blocks.0.mlp.hook_post`` [B, n_ctx, d_mlp] (ReLU output, so |post| = post). The L1 is
on the activations as they are; nothing fixes the scale of W_out, so the penalty also rewards
smaller W_in and larger W_out (Adam's bounded steps keep this slow over a short run).

Variants:
- ``"standard"``: resid_post = resid_mid + mlp_out, as in any transformer.
- ``"cut"``: resid_post = mlp_out. Two permanent hooks do it: one on ``blocks.0.hook_mlp_out`` keeps
  mlp_out = post @ W_out + b_out, one on ``blocks.0.hook_resid_post`` returns that kept tensor in
  place of resid_mid + mlp_out. The embeddings and the attention output then reach the logits only
  through the MLP: logits = unembed(ln_final(mlp_out)). Every forward (``model(...)``,
  ``run_with_cache``, ``run_with_hooks``) goes through the hooks; hooks added later see the cut value.

Data: the corpus is encoded and cut into non-overlapping contexts of n_ctx tokens (BOS + n_ctx - 1
characters); every ``HELD_OUT_EVERY``-th context is held out for evaluation and analysis, training
draws ``tokens // (batch_size * n_ctx)`` batches from the rest in an order fixed by the seed.
Training runs on one thread (deterministic; a second thread loses on a shared 2-core machine),
Adam with linear warm-up and cosine decay to 10%, gradient norm clipped at 1. Trained weights are
cached as ``<cache>/sparse_base/<key>.safetensors`` plus a JSON sidecar (config, vocabulary,
losses), keyed by a hash of the config; never pickle.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_save_tensors, atomic_write_bytes
from sparsekit._util.extras import require
from sparsekit._util.seeding import permutation
from sparsekit._util.validate import check_seed, positive_int, positive_number
from sparsekit.activations.mnist import default_cache_dir
from sparsekit.activations.text import load_text, token_contexts

VARIANTS = ("standard", "cut")
HOOK_POST = "blocks.0.mlp.hook_post"
HELD_OUT_EVERY = 20
BOS, UNK = "<bos>", "<unk>"
# Part of the cache key: bump it when training changes, so stale weights are never loaded.
TRAINING_VERSION = 1


@dataclass(frozen=True)
class SparseBaseConfig:
    """variant "standard" | "cut"; l1 the coefficient of the activation L1; tokens the training tokens
    (batch_size * n_ctx per step); model sizes; lr the peak Adam rate; min_char_count the vocabulary cut."""
    variant: str = "standard"
    l1: float = 3e-3
    tokens: int = 500_000
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    min_char_count: int = 100
    corpus: str = "shakespeare"
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if isinstance(self.l1, bool) or not isinstance(self.l1, (int, float)) or not 0 <= self.l1 < math.inf:
            raise ValueError(f"l1 must be a finite number >= 0, got {self.l1!r}")
        for name in ("tokens", "d_model", "n_heads", "d_mlp", "n_ctx", "batch_size", "warmup_steps", "min_char_count"):
            positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.n_ctx < 2:
            raise ValueError(f"n_ctx must be at least 2 (BOS and one character), got {self.n_ctx}")
        if self.tokens < self.batch_size * self.n_ctx:
            raise ValueError(f"tokens={self.tokens} is less than one batch (batch_size * n_ctx = "
                             f"{self.batch_size * self.n_ctx})")
        positive_number("lr", self.lr)
        check_seed(self.seed)

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.n_ctx)

    def key(self) -> str:
        """A short hash of every field and TRAINING_VERSION: the cache file's name."""
        fields = json.dumps({**dataclasses.asdict(self), "version": TRAINING_VERSION}, sort_keys=True)
        return (f"{self.variant}_l1{self.l1:g}_t{self.tokens}_s{self.seed}_"
                + hashlib.sha256(fields.encode()).hexdigest()[:12])


def build_vocabulary(text: str, min_count: int) -> list[str]:
    """[BOS, UNK, then every character seen >= min_count times, sorted]: id = position in the list."""
    counts = Counter(text)
    return [BOS, UNK] + sorted(c for c, n in counts.items() if n >= positive_int("min_count", min_count))


def encode(text: str, vocabulary: list[str]) -> Tensor:
    """Character ids [len(text)] int64; characters outside the vocabulary map to UNK (id 1)."""
    index = {c: i for i, c in enumerate(vocabulary)}
    return torch.tensor([index.get(c, 1) for c in text], dtype=torch.int64)


def decode(ids, vocabulary: list[str]) -> str:
    """Characters for ids (BOS shown as '⟨', UNK as '�')."""
    shown = {0: "⟨", 1: "�"}
    return "".join(shown.get(int(i), vocabulary[int(i)]) for i in ids)


@functools.lru_cache(maxsize=2)
def _encoded_corpus(corpus: str, min_char_count: int) -> tuple[list[str], Tensor]:
    # Reading and encoding the corpus takes seconds; a process that trains several models does it once.
    text = load_text(corpus)
    vocabulary = build_vocabulary(text, min_char_count)
    return vocabulary, encode(text, vocabulary)


def character_contexts(config: SparseBaseConfig) -> tuple[list[str], Tensor, Tensor]:
    """(vocabulary, training contexts [N_train, n_ctx], held-out contexts [N_held, n_ctx]) int64;
    context j is held out when j % HELD_OUT_EVERY == HELD_OUT_EVERY - 1."""
    vocabulary, ids = _encoded_corpus(config.corpus, config.min_char_count)
    vocabulary = list(vocabulary)
    contexts = token_contexts(ids, config.n_ctx, bos_id=0)
    held = torch.arange(contexts.shape[0]) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return vocabulary, contexts[~held], contexts[held]


def add_cut_residual_hooks(model) -> None:
    """Make ``blocks.0.hook_resid_post`` return mlp_out instead of resid_mid + mlp_out (permanent hooks)."""
    kept = {}

    def keep_mlp_out(mlp_out, hook):
        kept["mlp_out"] = mlp_out

    def replace_resid_post(resid_post, hook):
        return kept.pop("mlp_out")

    model.blocks[0].hook_mlp_out.add_hook(keep_mlp_out, is_permanent=True)
    model.blocks[0].hook_resid_post.add_hook(replace_resid_post, is_permanent=True)


def build_model(config: SparseBaseConfig, vocab_size: int):
    """A fresh 1-layer HookedTransformer for config (initialised from config.seed; the caller's RNG is
    untouched), with the cut-residual hooks when config.variant == "cut"."""
    lens = require("transformer_lens", "lens", what="the sparse-base toy (sparsekit toys sparse-base)")
    HookedTransformer, HookedTransformerConfig = lens.HookedTransformer, lens.HookedTransformerConfig

    tl_config = HookedTransformerConfig(
        n_layers=1, d_model=config.d_model, n_ctx=config.n_ctx, d_head=config.d_model // config.n_heads,
        n_heads=config.n_heads, d_mlp=config.d_mlp, d_vocab=positive_int("vocab_size", vocab_size),
        act_fn="relu", normalization_type="LN", device="cpu", seed=None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # TransformerLens 3.x warns that HookedTransformer goes in 4.0; docs/design.md pins >=3.9,<4.
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        torch.manual_seed(config.seed)
        model = HookedTransformer(tl_config)
    if config.variant == "cut":
        add_cut_residual_hooks(model)
    return model


def loss_terms(model, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(mean next-token CE, mean_{b,t} sum_i post[b, t, i]) for tokens [B, T]; both scalars with grad."""
    kept = {}

    def keep_post(post, hook):
        kept["post"] = post

    ce = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(HOOK_POST, keep_post)])
    return ce, kept["post"].abs().sum(-1).mean()


def learning_rate_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, contexts: Tensor, batch_size: int = 64) -> dict:
    """Held-out mean CE (nats/token), mean L1 and mean L0 (neurons > 0) of post per token."""
    ce = l1 = l0 = 0.0
    n = 0
    for i in range(0, contexts.shape[0], batch_size):
        batch = contexts[i:i + batch_size]
        logits, cache = model.run_with_cache(batch, names_filter=HOOK_POST)
        post = cache[HOOK_POST]
        logprobs = logits[:, :-1].log_softmax(-1)
        ce += -logprobs.gather(-1, batch[:, 1:, None]).sum().item() / (batch.shape[1] - 1)
        l1 += post.sum(-1).mean(-1).sum().item()
        l0 += (post > 0).sum(-1).float().mean(-1).sum().item()
        n += batch.shape[0]
    return {"ce": ce / n, "l1": l1 / n, "l0": l0 / n}


def train_model(config: SparseBaseConfig, train_contexts: Tensor, vocab_size: int, progress: bool = True):
    """Train a fresh model on train_contexts [N, n_ctx] -> (model in eval mode, history dict)."""
    from tqdm import tqdm

    model = build_model(config, vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.steps, config.warmup_steps))
    order = torch.cat([torch.from_numpy(permutation(train_contexts.shape[0], config.seed, epoch))
                       for epoch in range(math.ceil(config.steps * config.batch_size / train_contexts.shape[0]))])
    history = {"step": [], "ce": [], "l1": []}
    every = max(1, config.steps // 200)
    model.train()
    bar = tqdm(range(config.steps), desc=f"sparse base ({config.variant}, l1={config.l1:g})", disable=not progress,
               leave=False)
    for step in bar:
        batch = train_contexts[order[step * config.batch_size:(step + 1) * config.batch_size]]
        ce, l1 = loss_terms(model, batch)
        optimizer.zero_grad(set_to_none=True)
        (ce + config.l1 * l1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == config.steps - 1:
            history["step"].append(step)
            history["ce"].append(ce.item())
            history["l1"].append(l1.item())
            bar.set_postfix(ce=f"{ce.item():.3f}", l1=f"{l1.item():.2f}")
    return model.eval(), history


@dataclass
class SparseBaseModel:
    """A trained model with what is needed to read it: model (HookedTransformer), vocabulary
    (id -> character), config, record (history, held-out metrics, seconds), held_out contexts."""
    model: object
    vocabulary: list
    config: SparseBaseConfig
    record: dict
    held_out: Tensor


def _cache_paths(config: SparseBaseConfig, cache_dir) -> tuple[Path, Path]:
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "sparse_base"
    return folder / f"{config.key()}.safetensors", folder / f"{config.key()}.json"


def train_sparse_base(config: SparseBaseConfig = SparseBaseConfig(), progress: bool = True,
                      cache_dir=None) -> SparseBaseModel:
    """Train (or load the cached) model for config. Deterministic: one thread, fixed seeds."""
    weights, sidecar = _cache_paths(config, cache_dir)
    vocabulary, train_contexts, held_out = character_contexts(config)
    if weights.exists() and sidecar.exists():
        from safetensors.torch import load_file
        record = json.loads(sidecar.read_text())
        if record.get("config") != dataclasses.asdict(config) or record.get("vocabulary") != vocabulary:
            raise ValueError(f"{sidecar} does not match config {dataclasses.asdict(config)} and its vocabulary; "
                             f"delete the pair {weights.name} / {sidecar.name}")
        model = build_model(config, len(vocabulary))
        model.load_state_dict(load_file(weights))
        return SparseBaseModel(model.eval(), vocabulary, config, record, held_out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        model, history = train_model(config, train_contexts, len(vocabulary), progress)
        seconds = time.perf_counter() - start
        held = evaluate(model, held_out[:512])
    finally:
        torch.set_num_threads(threads)
    record = {"config": dataclasses.asdict(config), "vocabulary": vocabulary, "history": history,
              "held_out": held, "train_seconds": seconds, "version": TRAINING_VERSION}
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(model.state_dict(), weights)
    atomic_write_bytes(sidecar, json.dumps(record).encode())  # written last: its presence marks a complete pair
    return SparseBaseModel(model, vocabulary, config, record, held_out)
