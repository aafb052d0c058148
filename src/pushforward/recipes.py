"""The recipe registry: named model constructors that record their arguments.

A function decorated with :func:`recipe` is registered in :data:`RECIPES` under its name, and every
model it returns carries ``model.recipe = {"recipe": name, "kwargs": {...}}``, from which
:func:`pushforward.models.build` (and :func:`pushforward.io.load`) rebuild the same architecture
without unpickling code. The flow recipes live in :mod:`pushforward.models`, the VAE's in
:mod:`pushforward.vae`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["RECIPES", "build", "recipe"]

M = TypeVar("M", bound=nn.Module)

#: Every registered recipe by name.
RECIPES: dict[str, Callable[..., Any]] = {}


def recipe(fn: Callable[..., M]) -> Callable[..., M]:
    """Registers ``fn`` and records its bound arguments in the returned model's ``recipe``.

    Args:
        fn: a function returning an ``nn.Module`` (a :class:`~pushforward.core.Flow`, a VAE).

    Returns:
        The wrapped function; calling it returns ``fn``'s model with ``model.recipe`` set.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> M:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model = fn(*bound.args, **bound.kwargs)
        arguments = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}
        record: Any = {"recipe": fn.__name__, "kwargs": arguments}  # a plain attribute, not a module
        model.recipe = record
        return model

    RECIPES[fn.__name__] = wrapper
    return wrapper


def build(record: dict) -> Any:
    """Rebuilds a model from its ``model.recipe`` record (``{"recipe": name, "kwargs": {...}}``).

    Every recipe of the library is registered first (importing :mod:`pushforward.models` does that).

    Raises:
        ValueError: If the recipe name is unknown (the message lists the known ones).
    """
    from . import models  # noqa: F401  registers every recipe

    name = record.get("recipe")
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name](**record.get("kwargs", {}))
