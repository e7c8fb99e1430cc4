"""Import paths from before the layered layout keep working for one release (sparsekit._moved):
each warns with a DeprecationWarning naming the new path and hands back the very module that now
lives there; the paths the README documented before the move import the same names as before."""
import importlib
import subprocess
import sys
import warnings

import pytest

import sparsekit
from sparsekit._moved import MOVED

# Every `from sparsekit.<module> import ...` the README printed before the move (commit d8d1020).
DOCUMENTED = [
    ("sparsekit.activations", ["HFModuleSource", "load_lm"]),
    ("sparsekit.activations.lm_metrics", ["Splice", "evaluate_splices", "lm_splice_metrics"]),
    ("sparsekit.activations.store", ["LMActivationSource", "cache_activations", "corpus_contexts"]),
    ("sparsekit.analysis.lm_features", ["feature_report", "find_features"]),
    ("sparsekit.distributed", ["init_distributed"]),
    ("sparsekit.distributed_sharded", ["LatentShardedTopK", "mesh"]),
    ("sparsekit.toys.superposition", ["SuperpositionData", "feature_recovery"]),
]


def fresh_import(path: str):
    """Import `path` in a fresh interpreter: (exit code, stderr) with DeprecationWarnings shown."""
    code = f"import warnings; warnings.simplefilter('always'); import {path}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return result.returncode, result.stderr


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_gives_the_module_that_lives_at_the_new_one(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is new


@pytest.mark.parametrize("path, names", DOCUMENTED)
def test_the_paths_the_readme_documented_still_import_their_names(path, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(path)
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, f"{path} lost {missing}"


def test_a_moved_module_is_an_attribute_of_the_package_too(monkeypatch):
    monkeypatch.delattr(sparsekit, "memory", raising=False)  # set when an earlier test imported the old path
    with pytest.warns(DeprecationWarning, match="sparsekit.memory moved to sparsekit.training.memory"):
        memory = sparsekit.memory
    assert memory.estimate_training_memory is importlib.import_module("sparsekit.training.memory").estimate_training_memory
    with pytest.raises(AttributeError, match="has no attribute 'no_such_module'"):
        sparsekit.no_such_module  # noqa: B018


def test_public_names_import_without_a_warning():
    code, err = fresh_import("sparsekit.reference, sparsekit.numpy, sparsekit.activations.store")
    assert code == 0 and "DeprecationWarning" not in err, err
    assert callable(sparsekit.train) and sparsekit.reference is importlib.import_module("sparsekit.ops.reference")


def test_a_fresh_interpreter_sees_the_warning_for_an_old_path():
    code, err = fresh_import("sparsekit.distributed")
    assert code == 0 and "sparsekit.distributed moved to sparsekit.training.parallel.data" in err, err
