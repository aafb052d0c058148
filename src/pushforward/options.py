"""Every value a user gives, checked in one place: config keys, command-line options, recipe arguments.

Each value has a :class:`Rule`: its type and its range (numbers are always finite). A value that
breaks its rule is a ``ValueError`` that names the key, the value and what is allowed, raised when the
command line or the configuration is parsed, before anything is loaded, built or written:

- :data:`CONFIG_RULES`: every key of :class:`~pushforward.config.TrainConfig` (``--set``, TOML files
  and the options that set them: ``--epochs``, ``--max-steps``, ``--max-minutes``, ``--seed``);
  :func:`check_key` is what :func:`~pushforward.config.config_from_dict` applies;
- :data:`OPTION_RULES`: the options of ``eval``, ``sample``, ``demo`` and ``compare`` that are not
  config keys; :func:`parse_option` reads them from text (the command line's ``type=``);
- :func:`check_recipe_kwargs`: ``model.*`` and ``dequantizer.*`` against the recipe's signature (the
  name exists, the data fills in ``features`` / ``shape``, and the type and range follow the
  argument's default: a count stays a positive integer, a size list a list of positive integers;
  ``"auto"``: sized by the data set's loader).

This module imports neither torch nor numpy (the recipe check imports the recipes when it runs).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONFIG_RULES",
    "OPTION_RULES",
    "Rule",
    "check_key",
    "check_recipe_kwargs",
    "parse_option",
]

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Rule:
    """The type and range of one value.

    ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``dict`` or ``list`` (a list of positive
    integers); ``low`` / ``high`` bound numbers (``*_open``: strictly); ``pattern`` is a regular
    expression a string must match; ``note`` says what special values mean (``0: no limit``);
    ``sentinel`` is one special number allowed outside the range (``-1``: sized to the table).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    pattern: str = ""
    note: str = ""
    words: str = ""
    sentinel: float | None = None

    def allowed(self) -> str:
        """What the rule allows, in words: ``an integer >= 1``, ``a finite number in (0, 1)``."""
        if self.words:
            return self.words
        if self.kind is bool:
            return "true or false"
        if self.kind is dict:
            return "a table of keyword arguments"
        if self.kind is list:
            return "a list of positive integers, e.g. [64, 64]"
        if self.kind is str:
            return f"a string matching {self.pattern}" if self.pattern else "a string"
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            range_ = f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            range_ = f" {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            range_ = f" {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            range_ = ""
        if self.sentinel is not None:
            range_ += f", or {_num(self.sentinel)}"
        return what + range_ + (f" ({self.note})" if self.note else "")

    def convert(self, value: Any) -> Any:
        """``value`` as this rule's type; ``ValueError`` (without a message) if it is not one."""
        kind = self.kind
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if isinstance(value, bool):  # True is an int to Python, not to a user
            raise ValueError
        if kind is int:
            if isinstance(value, str):
                value = float(value) if re.fullmatch(r"\s*[-+]?\d+(\.0*)?([eE]\+?\d+)?\s*", value) else None
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return int(value)
            if isinstance(value, int):
                return value
            raise ValueError
        if kind is float:
            if isinstance(value, str | int | float):
                number = float(value)
                if math.isfinite(number):
                    return number
            raise ValueError
        if kind is str:
            if isinstance(value, dict | list):
                raise ValueError
            text = str(value)
            if self.pattern and not re.fullmatch(self.pattern, text, flags=re.IGNORECASE):
                raise ValueError
            return text
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if kind is list:
            if not isinstance(value, list | tuple) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ValueError
            return list(value)
        raise ValueError  # pragma: no cover

    def check(self, label: str, value: Any) -> Any:
        """The converted value, or ``ValueError("<label> = <value>: must be <allowed>")``."""
        try:
            out = self.convert(value)
            if isinstance(out, int | float) and not isinstance(out, bool) and not self._in_range(out):
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"{label} = {value!r}: must be {self.allowed()}") from None
        return out

    def _in_range(self, x: float) -> bool:
        if self.sentinel is not None and x == self.sentinel:
            return True
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _int(low: int = 1, note: str = "") -> Rule:
    return Rule(int, low=low, note=note)


def _positive() -> Rule:
    return Rule(float, low=0, low_open=True)


_FRACTION = Rule(float, low=0, high=1, low_open=True, high_open=True)
_SEED = Rule(int, low=0, high=_SEED_MAX, words="an integer in [0, 2**63 - 1]")

#: The rule of every key of :class:`~pushforward.config.TrainConfig`. ``condition`` and ``dequantization``
#: take one of a few words, which :class:`~pushforward.config.TrainConfig` itself checks.
CONFIG_RULES: dict[str, Rule] = {
    "data": Rule(str, pattern=r".+"),
    "recipe": Rule(str),
    "model": Rule(dict),
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
    "lr": _positive(),
    "lr_min": Rule(float, low=0, high=1),
    "warmup_steps": _int(0),
    "weight_decay": Rule(float, low=0, sentinel=-1, note="-1: sized to the table; 0 for other data"),
    "epochs": _int(1),
    "max_steps": _int(-1, "0: epochs decide; -1: sized to the table, for tables"),
    "max_minutes": Rule(float, low=0, note="0: no limit"),
    "clip": Rule(float, low=0, note="0: no clipping"),
    "ema": Rule(float, low=0, high=1, high_open=True, note="0: no average"),
    "noise": Rule(float, low=0, note="0: none"),
    "label_drop": Rule(float, low=0, high=1, high_open=True),
    "patience": _int(0, "0: never stop early"),
    "val_every": _int(-1, "0: once per epoch; -1: sized to the table, for tables"),
    "val_at_start": Rule(bool),
    "seed": _SEED,
    "run_dir": Rule(str),
    "device": Rule(str, pattern=r"auto|cpu|mps|(cuda|xpu)(:\d+)?",
                   words="auto, cpu, cuda, cuda:N, mps, xpu or xpu:N"),
    "threads": _int(0, "0: torch's default"),
    "n_train": _int(1),
    "n_val": _int(1),
    "n_test": _int(1),
    "val_fraction": _FRACTION,
    "test_fraction": _FRACTION,
    "max_train": _int(0, "0: all"),
    "progress": Rule(bool),
    "restore_best": Rule(bool),
    "condition": Rule(str),
    "dequantization": Rule(str),
    "dequantizer": Rule(dict),
    "objective": Rule(str),
    "amp": Rule(bool),
    "compile": Rule(bool),
    "checkpoint_grads": Rule(bool),
}

#: The rules of the command-line options that are not config keys, as ``command.option``.
OPTION_RULES: dict[str, Rule] = {
    "eval.batch_size": _int(1),
    "sample.n": Rule(int, low=1, high=100_000),
    "sample.temperature": _positive(),
    "sample.guidance": Rule(float, low=0),
    "sample.seed": _SEED,
    "sample.label": _int(0),
    "demo.density_steps": _int(1),
    "demo.image_steps": _int(1),
    "demo.max_minutes": Rule(float, low=0, note="0: no limit"),
    "compare.minutes": _positive(),
    "compare.max_steps": _int(0, "0: the data set's default"),
    "compare.eval_n": _int(0, "0: all"),
    "compare.ks": _int(1),
    "compare.seed": _SEED,
}


def check_key(name: str, value: Any) -> Any:
    """A config key's value converted to its type, or a ``ValueError`` naming the key, the value and
    what is allowed (``config key 'batch_size' = 0: must be an integer >= 1``)."""
    return CONFIG_RULES[name].check(f"config key {name!r}", value)


def parse_option(name: str, text: str) -> Any:
    """A command-line option's value read from ``text`` by its rule (``OPTION_RULES`` first, then
    ``CONFIG_RULES`` by the part after the dot); ``ValueError("must be ..., got '...'")``."""
    rule = OPTION_RULES.get(name) or CONFIG_RULES[name.rpartition(".")[2]]
    try:
        return rule.check("", text)
    except ValueError:
        raise ValueError(f"must be {rule.allowed()}, got {text!r}") from None


# -- recipe arguments -------------------------------------------------------------------------------------
#: Real recipe arguments that must be positive (the others need only be finite): bounds of log-scales
#: and spline tails, the logit's squeeze.
POSITIVE_ARGUMENTS = ("scale_bound", "tail_bound", "alpha")
#: Recipe arguments that come from the data (``features``, ``shape``) or from the dequantizer's flow.
FROM_DATA = ("features", "shape", "event_shape", "flow", "quantization_levels")


def _argument_rule(param: inspect.Parameter) -> Rule | None:
    """The rule a recipe argument's default implies (``None``: no rule, e.g. a nested recipe)."""
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return Rule(bool)
    if isinstance(default, int):
        return Rule(int, low=1) if default >= 1 else Rule(int, low=default)
    if isinstance(default, float):
        return Rule(float, low=0, low_open=True) if param.name in POSITIVE_ARGUMENTS else Rule(float)
    if isinstance(default, tuple | list):
        return Rule(list)
    if isinstance(default, str):
        return Rule(str)
    return None


def check_recipe_kwargs(recipe: str, kwargs: Mapping[str, Any], prefix: str = "model",
                        conditional: bool | None = None) -> None:
    """Checks ``kwargs`` (``model.*`` or ``dequantizer.*``) against the recipe's signature.

    The name must be an argument of the recipe and not one the data fill in; the value must fit the
    rule its default implies (an integer default of 1 or more: an integer >= 1, else at least the
    default; a float: a finite number, > 0 for :data:`POSITIVE_ARGUMENTS`; a tuple: a list of
    positive integers; a bool: true or false; ``"auto"``: left to the data set's loader).
    ``context_features`` is only for a class-conditional run (``conditional``).

    Raises:
        ValueError: an unknown recipe, an unknown or data-filled argument, or a value out of its rule.
    """
    from .models import RECIPES

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {', '.join(sorted(RECIPES))}")
    fn = RECIPES[recipe]
    params = inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"recipe {recipe!r} has no argument(s) {', '.join(map(repr, unknown))}; "
            f"its arguments are: {', '.join(params)}"
        )
    for name, value in kwargs.items():
        if value == "auto":  # sized by the data set's loader (tables)
            continue
        if name in FROM_DATA:
            raise ValueError(f"{prefix}.{name} comes from the data; remove it from the configuration")
        if name == "context_features" and conditional is False:
            raise ValueError(f"{prefix}.context_features is for class-conditional runs (condition = 'label')")
        rule = _argument_rule(params[name])
        if rule is None:
            continue
        if value is None and "None" in str(params[name].annotation):
            continue
        rule.check(f"{prefix}.{name}", value)
