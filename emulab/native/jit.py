"""The decorator of the compiled loops that serve a guest: numba without its runtime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from numba import njit

__all__ = ["NO_RUNTIME", "no_runtime"]

_F = TypeVar("_F", bound=Callable[..., Any])
NO_RUNTIME: dict[str, Any] = {"nogil": True, "cache": True, "_nrt": False}


def no_runtime(fn: _F) -> _F:
    """``@njit(nogil=True, cache=True)`` without numba's runtime (``_nrt=False``): no reference
    counts for the arrays a function is handed or takes out of a tuple -- each an atomic add
    and an indirect call, which with the runtime were 8.7 % of the wire loop's polling thread
    (``perf``: ``NRT_incref``/``NRT_decref``) -- and no allocation (it does not compile). Every
    array is borrowed from the caller, which holds it for the call; such a function returns
    scalars, never arrays (a caller with the runtime would release one it never owned)."""
    return cast(_F, njit(**NO_RUNTIME)(fn))
