"""Trusted Python code named in configuration ("package.module:function"): HTTP hooks'
`python`, an OAuth provider's `token_provider` (and the like): parsed and imported here
once, each caller wording the error for its own key."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from dripd.errors import DripdError

__all__ = ["LoadError", "load_async_function", "split_python_path"]

_DOTTED: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


class LoadError(DripdError):
    """The function could not be loaded: `message` says why (without the path), `detail`
    is the imported code's own exception text when there is one (it may say anything: a
    caller that must not show it leaves it out)."""

    code = "load"

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


def split_python_path(path: str) -> tuple[str, str] | None:
    """`("package.module", "attr")` from "package.module:attr" or "package.module.attr"."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(attr)):
        return None
    return module, attr


def load_async_function(path: str) -> Callable[..., Awaitable[Any]]:
    """Import the `async def` function at `path`; LoadError saying why not (not a Python
    path, the import failed, no such attribute, not an async function)."""
    split = split_python_path(path)
    if split is None:
        raise LoadError("is not a Python path like 'package.module:function'")
    module_name, attr = split
    try:
        found: object = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the host application's code: anything
        raise LoadError(
            f"cannot import {module_name!r}: {type(exc).__name__}", detail=str(exc)
        ) from exc
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise LoadError(f"{module_name!r} has no attribute {attr!r}") from None
    if not inspect.iscoroutinefunction(found):
        raise LoadError("is not an async function (define it with `async def`)")
    return cast(Callable[..., Awaitable[Any]], found)
