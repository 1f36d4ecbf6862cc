"""Lazy, mode-specific loading of the Triton kernel modules.

`@triton.jit` decides at *decoration* time whether a kernel is compiled (JITFunction) or run by the
interpreter (InterpretedFunction), from `triton.knobs.runtime.interpret` (env `TRITON_INTERPRET`).
So no kernel module is imported at package import. `load(name, interpret)` executes a private copy
of `kernels/<name>.py` with the knob forced to the requested mode, once per (name, mode), and
restores the knob. A test can therefore run the interpreter for its own calls while the rest of
the process keeps the torch reference, and flipping the environment later never leaves a stale
kernel of the wrong kind behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from dsv4.kernels import settings

_lock = threading.Lock()
_cache: dict[tuple[str, bool], ModuleType] = {}


def triton_available() -> bool:
    """True when `triton` imports (it may still have no GPU driver)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but keep the CPU path alive without it
        return False
    return True


def interpreter_on() -> bool:
    """The Triton interpreter switch: env TRITON_INTERPRET (as read at start-up: `settings`) or
    `triton.knobs.runtime.interpret` (read now)."""
    if settings.current().interpret:
        return True
    if "triton" not in sys.modules:
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


_interp_fns: dict[int, object] = {}


def _swap_stdlib_to_interpreted() -> list[tuple[ModuleType, str, object]]:
    """Replace the compiled `@jit` helpers of triton.language (tl.zeros, tl.max, tl.sum, ...) by interpreted
    twins; returns what to restore. Needed when `triton.language` was imported with the interpreter off:
    the interpreter cannot call a JITFunction ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    undo: list[tuple[ModuleType, str, object]] = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "triton.language" or mod_name.startswith("triton.language.")):
            continue
        for attr, member in list(vars(mod).items()):
            if isinstance(member, JITFunction):
                twin = _interp_fns.get(id(member))
                if twin is None:
                    twin = _interp_fns.setdefault(id(member), InterpretedFunction(member.fn))
                setattr(mod, attr, twin)
                undo.append((mod, attr, member))
    return undo


@contextlib.contextmanager
def interpret_mode(on: bool) -> Iterator[None]:
    """Temporarily set `triton.knobs.runtime.interpret` (restored afterwards, even on error). Turning it on
    also swaps triton.language's own `@jit` helpers for interpreted twins for the duration."""
    import triton

    knobs = triton.knobs.runtime
    old = knobs.interpret
    knobs.interpret = on
    undo = _swap_stdlib_to_interpreted() if on else []
    try:
        yield
    finally:
        for mod, attr, member in reversed(undo):
            setattr(mod, attr, member)
        knobs.interpret = old


def load(name: str, interpret: bool) -> ModuleType:
    """The kernel module `dsv4.kernels.<name>` built for the interpreter or for compilation."""
    key = (name, interpret)
    mod = _cache.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _cache.get(key)
        if mod is not None:
            return mod
        path = Path(__file__).with_name(f"{name}.py")
        if not path.is_file():
            raise ValueError(f"no kernel module named {name!r} ({path})")
        mod_name = f"dsv4.kernels._{name}_{'interp' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        with interpret_mode(interpret):
            spec.loader.exec_module(mod)
        _cache[key] = mod
        return mod
