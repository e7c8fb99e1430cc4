"""What the adversarial checkpoint tests (tests/adversarial/) share: a tiny checkpointed TopK run,
ways to damage or forge a checkpoint, and a child process under a memory cap and a timeout."""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import torch

import sparsekit
from sparsekit.training import checkpoint as ckpt

D, N, K, B = 8, 32, 3, 64
ROOT = Path(__file__).resolve().parents[2]
CHILD_MEMORY = 2 << 30   # bytes of address space a child case may map
CHILD_TIMEOUT = 240      # seconds


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def batches(seed: int, count: int = 16, d: int = D) -> list:
    """`count` batches [B, d] of sparse data drawn from `seed` (batch 0 is the held-out split)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(40, d, generator=gen), dim=-1)
    return [((torch.rand(B, 40, generator=gen) < 0.1).float() * torch.rand(B, 40, generator=gen)) @ features
            for _ in range(count)]


def config(directory, steps: int = 10, **overrides) -> sparsekit.TrainConfig:
    """Checkpoints every 2 steps into directory (None: no checkpoints)."""
    every = dict(checkpoint_dir=str(directory), checkpoint_every_tokens=2 * B) if directory is not None else {}
    return sparsekit.TrainConfig(batch_size=B, total_tokens=steps * B, eval_tokens=B, lr=3e-3, log_every=2,
                                 progress=False, **{**every, **overrides})


def train(directory, seed: int, steps: int = 10, resume: bool = False, **overrides):
    """A TopK SAE trained `steps` steps on batches(seed), shuffled by a TensorSource (whose
    position and epoch a checkpoint holds); the TrainResult."""
    from sparsekit.activations import TensorSource

    sae = sparsekit.TopKSAE(D, N, k=K, seed=seed % 1000)
    source = TensorSource(torch.cat(batches(seed)), batch_size=B, shuffle=True, seed=seed % 997)
    return sparsekit.train(sae, source, config(directory, steps, **overrides), resume=resume)


def same_parameters(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[name], sb[name]) for name in sa)


def steps_in(directory) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.checkpoint_folders(directory)]


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(".step_"))


def rewrite_state(path, edit, rechecksum: bool) -> None:
    """Apply edit(state) to checkpoint `path`'s state.json; with `rechecksum`, recompute state_sha256
    afterwards (a forger who knows the format), so only the schema or consistency checks can catch it."""
    state_file = Path(path) / ckpt.STATE_JSON
    state = json.loads(state_file.read_text())
    edit(state)
    if rechecksum and isinstance(state, dict):
        state["state_sha256"] = ckpt.state_digest(state)
    state_file.write_text(json.dumps(state, indent=1))


def flip_byte(path, rng: random.Random) -> None:
    data = bytearray(Path(path).read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    Path(path).write_bytes(bytes(data))


def damage(path, how: str, rng: random.Random) -> None:
    """Make checkpoint folder `path` invalid in one of DAMAGES' ways."""
    path = Path(path)
    tensors, state = path / ckpt.STATE_TENSORS, path / ckpt.STATE_JSON
    if how == "tensors truncated":
        tensors.write_bytes(tensors.read_bytes()[: rng.randrange(1, tensors.stat().st_size)])
    elif how == "tensor bit flipped":
        flip_byte(tensors, rng)
    elif how == "tensors deleted":
        tensors.unlink()
    elif how == "state.json garbage":
        state.write_bytes(os.urandom(rng.randrange(1, 200)))
    elif how == "state field edited":
        rewrite_state(path, lambda s: s.update(input_scale=s["input_scale"] * rng.uniform(1.5, 3)), rechecksum=False)
    elif how == "state.json deleted":
        state.unlink()
    elif how == "state.json a list":
        state.write_text("[]")
    else:
        raise ValueError(how)


DAMAGES = ("tensors truncated", "tensor bit flipped", "tensors deleted", "state.json garbage", "state field edited",
           "state.json deleted", "state.json a list")


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


def run_capped(args: list, cwd=None, timeout: int = CHILD_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `python *args` in a child under an address-space cap (CHILD_MEMORY) and a timeout, with
    this tree's sparsekit and tests/helpers importable; the completed process (text output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_cap_memory)
