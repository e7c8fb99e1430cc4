"""Triton's interpreter (TRITON_INTERPRET=1) without its repeated language patching.

The interpreter runs a kernel launch by patching ``triton.language`` (every builtin replaced by a
NumPy-backed one) for the launch's duration. It also re-patches on every call of a nested
``@triton.jit`` helper (``select.sortable_key``, ``_digit_histogram``, ...), once per program and
loop iteration, although the enclosing launch has already patched the same modules: each such call
walks ``inspect.getmembers`` over four packages (about 1 ms) and finds nothing left to patch. On
the small cases the tests run that is about half of all the time spent (measured on the TopK
selection kernel: 3.0 s of 6.5 s profiled).

``skip_redundant_patching`` wraps the interpreter's ``_patch_lang`` so that a nested helper call
whose language modules are patched already does nothing: by the enclosing launch (restored when it
ends), or by an earlier helper call (Triton never restores those: ``triton.language.standard``'s
``cumsum``/``sum``/``max`` see ``triton.language.core``, which the kernels' launches do not patch).
Kernel launches, and the first helper call that sees another module, go through Triton's own function.
What every builtin does is unchanged (the same patched functions stay in place); only the repeated
walks are skipped. Applied by ``_config`` when interpreting; a Triton without these internals is
left as it is.
"""
from __future__ import annotations

import inspect

_LANGS_OF: dict = {}  # id(function globals) -> its language modules, found once per module


def _lang_modules(fn) -> frozenset:
    """The triton.language modules the interpreter would patch for ``fn`` (as Triton finds them)."""
    import triton.language as tl

    found = _LANGS_OF.get(id(fn.__globals__))
    if found is None:
        found = _LANGS_OF[id(fn.__globals__)] = frozenset(
            id(value) for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core))
    return found


class _LaunchScope:
    """Triton's patch scope of one launch: restoring it also ends the launch's record."""

    def __init__(self, scope, active: list):
        self._scope, self._active = scope, active

    def restore(self) -> None:
        self._active.pop()
        self._scope.restore()


def skip_redundant_patching() -> bool:
    """Install the wrapper (once); True when installed, False when Triton's internals differ."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - Triton is imported by every kernel module already
        return False
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or not hasattr(interpreter, "InterpretedFunction") or not hasattr(interpreter, "GridExecutor"):
        return False
    if getattr(original, "_sparsekit_wrapper", False):
        return True
    active: list[frozenset] = []  # the language modules patched by each launch in progress
    left_patched: set = set()  # modules a helper patched in Triton's own way, which never restores them

    def patch_lang(fn):
        langs = _lang_modules(fn)
        if active:  # a helper called inside a launch
            if langs <= active[-1] | left_patched:
                return None  # every module it sees is patched already
            scope = original(fn)
            left_patched.update(langs)
            return scope
        left_patched.difference_update(langs)  # this launch restores what it patches: patch again next time
        scope = original(fn)
        active.append(langs)
        return _LaunchScope(scope, active)

    patch_lang._sparsekit_wrapper = True
    interpreter._patch_lang = patch_lang
    return True
