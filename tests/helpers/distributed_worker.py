"""One rank of a distributed test run: `python distributed_worker.py SCENARIO OUT` with torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set by tests/training/test_distributed.py.

Scenarios (each rank writes OUT/<name>_rank<r>.safetensors and .json):
  parity   data-parallel TopK and BatchTopK runs (float64) for comparison with one process, and
           five steps of a latent-sharded TopK SAE (LatentShardedTopK) and its AuxK gradients, and
           sparsekit.train on latent shards of the SHARDED_TRAIN_CASES (checkpoints every 2 steps),
           the PARITY_CASES for PRECISION_STEPS in float64 and float32, then the resume scenario's runs
  precision  the PARITY_CASES for PRECISION_STEPS (or argv[3]) steps in float64 and float32
  resume   an uninterrupted run, and one stopped mid-way (every rank's source fails at the same
           batch) then resumed from rank 0's checkpoint in the same processes; the same stop and
           resume with a latent-sharded dictionary
  raise    rank 1's source raises at its sixth batch: every rank must stop promptly with rank 1's error
  mesh     (4 ranks) sparsekit.train on a 2 x 2 mesh (data x latent) of the MESH_CASES
  nan      rank 1's source yields a NaN batch (the trainer refuses it): the same
  diverge  rank 1's source yields a batch of 1e200 (finite, so it passes the source check; its
           squared error overflows): every rank must raise TrainingDiverged at the same step
  failures diverge, then nan, in the same processes (each rank prints when and how it stopped)
The cases are built by ``make_case``, which the test also calls to train the one-process reference.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import sparsekit
from sparsekit.activations import TensorSource

BATCH, STEPS, D_IN, N_LATENTS, K = 64, 5, 12, 48, 3


def planted_rows(rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of 30 unit directions in float64 [rows, D_IN]."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(30, D_IN, generator=gen, dtype=torch.float64), dim=-1)
    active = (torch.rand(rows, 30, generator=gen) < 0.1).double() * torch.rand(rows, 30, generator=gen, dtype=torch.float64)
    return active @ features + 0.01 * torch.randn(rows, D_IN, generator=gen, dtype=torch.float64)


PLANTED_DEAD = [0, 1, 2, 45, 46, 47]  # latents that cannot fire, on both halves (shards) of the dictionary
PARITY_CASES = ("topk", "batchtopk", "topk-auxk", "batchtopk-auxk", "relu-ghost")
SHARDED_TRAIN_CASES = ("topk-auxk", "batchtopk", "relu-ghost")
PRECISION_STEPS = 25  # the PARITY_CASES run longer, in float64 and float32: how far apart do W ranks and one process end?
PRECISION_DTYPES = {"float64": torch.float64, "float32": torch.float32}


MESH_CASES = ("topk-auxk", "batchtopk-auxk", "relu-ghost")


def shard_of(sae, mesh=None):
    """This rank's latent shard of a full dictionary (every rank built the same one); on a 2-D mesh
    (sparsekit.training.parallel.sharded.mesh) the shard of its latent group, trained data parallel."""
    from sparsekit.training.parallel.sharded import LatentShardedBatchTopK, LatentShardedReLU, LatentShardedTopK
    cls = {"topk": LatentShardedTopK, "batchtopk": LatentShardedBatchTopK, "relu": LatentShardedReLU}[sae.architecture]
    if mesh is None:
        return cls.from_dictionary(sae)
    return cls.from_dictionary(sae, group=mesh.latent_group, data_group=mesh.data_group)


def make_case(name: str, directory: str | None = None, resume_every: int | None = None,
              dtype: torch.dtype = torch.float64, steps: int = STEPS):
    """(sae, source, TrainConfig) of a named case (PARITY_CASES); float64 by default so the comparison
    can be tight (float32 for PRECISION_CASES). Six latents cannot fire and count as dead after two
    steps, so AuxK and ghost grads act from step 3 on."""
    architecture, _, remedy = name.partition("-")
    if architecture == "relu":
        sae = sparsekit.ReLUSAE(D_IN, N_LATENTS, l1_coeff=1e-2, dtype=dtype, seed=1)
    else:
        sae = {"topk": sparsekit.TopKSAE, "batchtopk": sparsekit.BatchTopKSAE}[architecture](
            D_IN, N_LATENTS, k=K, dtype=dtype, seed=1)
    with torch.no_grad():  # latents that cannot fire: the dead counters have something to count
        sae.b_enc[PLANTED_DEAD] = -5.0
    cfg = sparsekit.TrainConfig(batch_size=BATCH, lr=3e-3, total_tokens=BATCH * steps, eval_tokens=128,
                                log_every=1, dead_window_tokens=2 * BATCH, progress=False, lr_decay_fraction=0.4,
                                checkpoint_dir=directory, checkpoint_every_tokens=resume_every,
                                dead_strategy=remedy or "none", aux_k=4, aux_coeff=0.5)
    source = TensorSource(planted_rows().to(dtype), batch_size=50, shuffle=True, seed=3)
    return sae, source, cfg


def adam_steps(model, steps: int = STEPS, clip: float = 0.05) -> list:
    """The trainer's update written out (mse, decoder projection, clipping, Adam, renormalisation)
    on the first steps * BATCH planted rows; for a full dictionary or a LatentShardedTopK shard.
    Returns the first step's x_hat. clip is small so that clipping acts."""
    x = planted_rows()[:steps * BATCH]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=True)
    first = None
    for step in range(steps):
        out = model(x[step * BATCH:(step + 1) * BATCH])
        first = out.x_hat.detach() if first is None else first
        optimizer.zero_grad()
        out.losses["mse"].backward()
        model.remove_parallel_decoder_grad()
        if hasattr(model, "clip_grad_norm_"):
            model.clip_grad_norm_(clip)
        else:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        optimizer.step()
        model.normalize_decoder()
    return first


def sharded_case(architecture: str = "topk"):
    cls = {"topk": sparsekit.TopKSAE, "batchtopk": sparsekit.BatchTopKSAE}[architecture]
    sae = cls(D_IN, N_LATENTS, k=K, dtype=torch.float64, seed=2)
    with torch.no_grad():
        sae.b_dec.copy_(planted_rows(256, seed=5).mean(0))
    return sae


AUX_DEAD = {"both shards": [0, 3, 5, 30, 31, 40], "one shard": [2, 7]}  # shard 0: 0..23, shard 1: 24..47


def auxk_gradients(model, dead: list, k_aux: int = 4) -> dict:
    """loss = mse + AuxK over `dead` (global latent indices) for one batch, backward; returns the
    loss and every gradient in the full dictionary's layout (a shard gathers them)."""
    from sparsekit.training.dead_latents import auxk_loss

    x = planted_rows(BATCH, seed=9)
    out = model(x)
    residual = x - out.x_hat
    if hasattr(model, "auxk_loss"):
        mine = [i - model.offset for i in dead if model.offset <= i < model.offset + model.n_local]
        aux = model.auxk_loss(x, residual, torch.tensor(mine, dtype=torch.int64), k_aux)
    else:
        aux = auxk_loss(model, x, residual, torch.tensor(dead), k_aux)
    (out.losses["mse"] + aux).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    if hasattr(model, "auxk_loss"):
        for name, dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0)):
            grads[name] = torch.cat(model._all_gather(grads[name]), dim=dim)
    return {"aux": aux.detach().reshape(1), **grads}


def remedy_case(name: str):
    """(sae, source, config) of runs with the parts that are not exact across world sizes (AuxK,
    ghost grads, resampling, L1/L0 penalties, a transcoder): every rank must still end identical."""
    x = planted_rows()
    cfg = dict(batch_size=BATCH, lr=3e-3, total_tokens=BATCH * 8, eval_tokens=0, log_every=4,
               dead_window_tokens=2 * BATCH, progress=False, resample_at_tokens=(BATCH * 4,))
    if name == "relu-resample-ghost":
        sae = sparsekit.ReLUSAE(D_IN, N_LATENTS, l1_coeff=1e-2, dtype=torch.float64)
        cfg["dead_strategy"] = "resample+ghost"
    elif name == "jumprelu":
        sae = sparsekit.JumpReLUSAE(D_IN, N_LATENTS, l0_coeff=1e-3, bandwidth=0.05, init_threshold=0.05,
                                    dtype=torch.float64)
    else:
        sae = sparsekit.Transcoder(D_IN, N_LATENTS, 6, k=K, dtype=torch.float64)
        x = (x, x[:, :6] * 2 + 0.1)
        cfg["dead_strategy"] = "auxk"
    with torch.no_grad():
        sae.b_enc[:6] = -5.0
    return sae, x, sparsekit.TrainConfig(**cfg)


REMEDY_CASES = ("relu-resample-ghost", "jumprelu", "transcoder-auxk")


class FailingSource:
    """Wraps a source; raises `error` when asked for batch number `at` (1-based)."""

    def __init__(self, source, at: int, error: Exception):
        self.source, self.at, self.error = source, at, error

    def __iter__(self):
        for number, batch in enumerate(self.source, start=1):
            if number == self.at:
                raise self.error
            yield batch

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


class PoisonedSource(FailingSource):
    """Wraps a source; batch number `at` (1-based) has every value replaced by `value`."""

    def __init__(self, source, at: int, value: float):
        super().__init__(source, at, None)
        self.value = value

    def __iter__(self):
        for number, batch in enumerate(self.source, start=1):
            yield torch.full_like(batch, self.value) if number == self.at else batch


class Interrupted(Exception):
    pass


def save(out: Path, name: str, rank: int, sae, result) -> None:
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(out / f"{name}_rank{rank}.safetensors"))
    (out / f"{name}_rank{rank}.json").write_text(json.dumps({"metrics": result.metrics, "history": result.history}))


def resume_runs(out: Path, rank: int) -> None:
    """An uninterrupted run, and one stopped mid-way (every rank's source fails at the same batch)
    then resumed from rank 0's checkpoint in the same processes; the same stop and resume with a
    latent-sharded dictionary."""
    sae, source, cfg = make_case("topk", str(out / "whole"), resume_every=BATCH)
    save(out, "whole", rank, sae, sparsekit.train(sae, source, cfg))
    sae, source, cfg = make_case("topk", str(out / "stopped"), resume_every=BATCH)
    try:  # 50-row chunks, 128 held out: chunk 7 is first read for step 3, after step 2's checkpoint
        sparsekit.train(sae, FailingSource(source, 7, Interrupted()), cfg)
        raise AssertionError("the run was meant to stop")
    except Interrupted:
        pass
    sae, source, cfg = make_case("topk", str(out / "stopped"), resume_every=BATCH)
    save(out, "resumed", rank, sae, sparsekit.train(sae, source, cfg, resume=True))
    sae, source, cfg = make_case("topk", str(out / "sharded"), resume_every=BATCH)
    try:
        sparsekit.train(shard_of(sae), FailingSource(source, 7, Interrupted()), cfg)
        raise AssertionError("the run was meant to stop")
    except Interrupted:
        pass
    sae, source, cfg = make_case("topk", str(out / "sharded"), resume_every=BATCH)
    shard = shard_of(sae)
    result = sparsekit.train(shard, source, cfg, resume=True)
    save(out, "sharded_resumed", rank, shard.gather(), result)


def precision_runs(out: Path, rank: int, steps: int = PRECISION_STEPS) -> None:
    """The PARITY_CASES trained for `steps` steps in float64 and in float32."""
    for dtype_name, dtype in PRECISION_DTYPES.items():
        for name in PARITY_CASES:
            sae, source, cfg = make_case(name, dtype=dtype, steps=steps)
            save(out, f"precision_{dtype_name}_{name}", rank, sae, sparsekit.train(sae, source, cfg))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    from sparsekit.training.parallel.data import init_distributed
    info = init_distributed(timeout_s=float(os.environ.get("SPARSEKIT_DIST_TIMEOUT_S", "60")))
    rank = info.rank
    if scenario == "parity":
        for name in PARITY_CASES:
            sae, source, cfg = make_case(name)
            save(out, name, rank, sae, sparsekit.train(sae, source, cfg))
        for name in REMEDY_CASES:
            sae, source, cfg = remedy_case(name)
            save(out, name, rank, sae, sparsekit.train(sae, source, cfg))
        from sparsekit.training.parallel.sharded import LatentShardedBatchTopK, LatentShardedTopK
        for name, cls in (("topk", LatentShardedTopK), ("batchtopk", LatentShardedBatchTopK)):
            shard = cls.from_dictionary(sharded_case(name))
            first_x_hat = adam_steps(shard)
            tensors = {k: v.contiguous() for k, v in shard.gather().state_dict().items()}
            save_file({**tensors, "first_x_hat": first_x_hat, "shard_W_enc": shard.W_enc.detach().contiguous()},
                      str(out / f"sharded_{name}_rank{rank}.safetensors"))
        for case, dead in AUX_DEAD.items():
            shard = LatentShardedTopK.from_dictionary(sharded_case())
            save_file(auxk_gradients(shard, dead), str(out / f"auxk_{case.replace(' ', '_')}_rank{rank}.safetensors"))
        for name in SHARDED_TRAIN_CASES:
            sae, source, cfg = make_case(name, str(out / f"sharded_train_{name}"), resume_every=2 * BATCH)
            shard = shard_of(sae)
            result = sparsekit.train(shard, source, cfg)
            save(out, f"sharded_train_{name}", rank, shard.gather(), result)
        precision_runs(out, rank)
        resume_runs(out, rank)
    elif scenario == "precision":  # with a third argument: the number of steps (measuring longer runs)
        precision_runs(out, rank, int(sys.argv[3]) if len(sys.argv) > 3 else PRECISION_STEPS)
    elif scenario == "resume":
        resume_runs(out, rank)
    elif scenario == "mesh":
        from sparsekit.training.parallel.sharded import mesh
        grid = mesh(latent_shards=2)
        for name in MESH_CASES:
            sae, source, cfg = make_case(name, str(out / f"mesh_{name}"), resume_every=2 * BATCH)
            shard = shard_of(sae, grid)
            result = sparsekit.train(shard, source, cfg)
            save(out, f"mesh_{name}", rank, shard.gather(), result)
    elif scenario in ("raise", "nan", "diverge", "failures"):
        # failures: diverge (every rank raises by itself, so the processes go on), then nan
        for part in (("diverge", "nan") if scenario == "failures" else (scenario,)):
            sae, source, cfg = make_case("topk")
            if rank == 1:  # 50-row chunks, 128 held out: chunk 6 (rows 250-299) feeds step 2, rank 1's half too
                source = {"raise": lambda: FailingSource(source, 6, ValueError("rank 1 failed on purpose")),
                          "nan": lambda: PoisonedSource(source, 6, float("nan")),
                          "diverge": lambda: PoisonedSource(source, 6, 1e200)}[part]()
            try:
                sparsekit.train(sae, source, cfg)
                raise AssertionError("rank 1 was meant to fail")
            except Exception as error:
                print(f"rank {rank} stopped ({part}) at {time.monotonic():.3f}: {type(error).__name__}: {error}",
                      flush=True)
                if part != "diverge":
                    os._exit(3)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    from sparsekit.training.parallel.data import shutdown_distributed
    shutdown_distributed()
    print(f"rank {rank} done", flush=True)
    # Everything is written. Skip interpreter finalisation: gloo's worker threads can still hold
    # tensors then and abort the process (SIGABRT, "terminate called without an active exception";
    # about 1 run in 7 here without the barrier above, rarer with it; pytorch/pytorch#179291 describes it).
    os._exit(0)


if __name__ == "__main__":
    main()
