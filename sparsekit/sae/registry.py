"""The architecture registry: cfg.json's ``"architecture"`` string -> the class that builds it.

A leaf (it imports nothing of sparsekit). Each architecture is one module in ``sparsekit.sae``
whose class declares, once, every fact the other layers read:

- ``architecture``: the name in cfg.json, on the command line and in error messages;
- ``hyperparameter_specs``: its constructor arguments (name, type, help, required, default), which
  ``sparsekit train`` turns into flags and cfg.json records;
- ``code_kind``: what ``encode`` returns while training: "topk" (TopKCodes), "batchtopk"
  (BatchTopKCodes) or "dense" ([B, n]), which decides sparse-code memory and AuxK support;
- ``batch_by_latent_buffers``: [B, n]-sized tensors one training step holds at once (the memory
  estimate); ``parameters_per_latent``: parameters beyond the shared W_enc/b_enc/W_dec ones;
- ``saelens_architecture`` / ``saelens_transcoder_architecture``: the SAELens 6.x names it exports
  as (None: not exportable);
- ``trained_by_train``: whether ``sparsekit.train`` (and ``sparsekit train``) trains it; False for a
  dictionary with its own trainer (the cross-layer transcoder: ``sparsekit train-clt``), which the
  trainer's and constructors' lists of choices then leave out.

``register`` refuses a class that does not name its own architecture. The other facts default to
SparseDictionary's (no hyperparameters, dense codes, one [B, n] buffer, no SAELens equivalent), so
a new architecture declares those where it differs; ``tests/sae/test_new_architecture.py`` adds one
in a test file and trains, saves, estimates and exports it with nothing else changed.
"""
from __future__ import annotations

import dataclasses
import difflib

ARCHITECTURES: dict[str, type] = {}
CODE_KINDS = ("topk", "batchtopk", "dense")
FACTS = ("architecture", "hyperparameter_specs", "code_kind", "batch_by_latent_buffers", "parameters_per_latent",
         "saelens_architecture", "saelens_transcoder_architecture", "trained_by_train")


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One architecture-specific constructor argument: ``sparsekit train --<name>`` and a cfg.json key."""
    name: str
    kind: type           # int, float, bool or tuple
    help: str
    required: bool = True
    default: object = None
    flag: bool = True    # False: a constructor argument only, not a `sparsekit train` flag
    element: type | None = None  # a tuple's element type (int or float): `--name 128,512,2048`


def register(cls: type) -> type:
    """Class decorator: ``cls.architecture`` -> cls, after checking the class declares every fact."""
    if "architecture" not in vars(cls):
        raise TypeError(f"{cls.__name__} must declare its own architecture name (a class attribute) to be registered")
    missing = [fact for fact in FACTS if not hasattr(cls, fact)]
    if missing:
        raise TypeError(f"{cls.__name__} must declare {', '.join(missing)} to be registered")
    if cls.code_kind not in CODE_KINDS:
        raise TypeError(f"{cls.__name__}.code_kind must be one of {', '.join(CODE_KINDS)}, got {cls.code_kind!r}")
    name = cls.architecture
    if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
        raise ValueError(f"architecture {name!r} is already registered by {ARCHITECTURES[name].__name__}")
    ARCHITECTURES[name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Every registered architecture, in registration order."""
    return tuple(ARCHITECTURES)


def trainable() -> tuple[str, ...]:
    """The architectures ``sparsekit.train`` trains, in registration order."""
    return tuple(name for name, cls in ARCHITECTURES.items() if cls.trained_by_train)


def get(name) -> type:
    """The class registered as ``name``; a ValueError naming the choices (and the closest) otherwise."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    close = difflib.get_close_matches(str(name), ARCHITECTURES, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown architecture {name!r}{hint}; choose one of {', '.join(ARCHITECTURES)}")


def hyperparameters() -> dict[str, Hyperparameter]:
    """Every architecture's hyperparameters by name (one spec per name: architectures that share a
    name, such as k, share its meaning)."""
    found = {}
    for cls in ARCHITECTURES.values():
        for spec in cls.hyperparameter_specs:
            found.setdefault(spec.name, spec)
    return found


def architectures_taking(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(architectures that accept hyperparameter ``name``, those of them that require it)."""
    takes = tuple(a for a, cls in ARCHITECTURES.items() if any(s.name == name for s in cls.hyperparameter_specs))
    needs = tuple(a for a in takes if any(s.name == name and s.required for s in ARCHITECTURES[a].hyperparameter_specs))
    return takes, needs
