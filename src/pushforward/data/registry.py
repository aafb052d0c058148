"""One registry of data sets: every data set the library, the command line and the docs know is one entry.

An entry names the data set and says how to load its three splits, what kind of data it is, which
recipe and training settings suit it, what the command line needs (grey levels of images, the number
of classes for ``--condition label``) and one help line. :func:`pushforward.config.resolve_config`
takes its defaults from the entry, :func:`pushforward.experiment.load_dataset` calls its loader,
``pushforward --help`` lists it. Adding a data set is one call::

    from pushforward.data import Dataset, register

    def load_blobs(config):  # config: the run's TrainConfig (seed, split sizes, ...)
        ...
        return Dataset("blobs", "table", train, val, test, event_shape=(3,))

    register("blobs", kind="table", load=load_blobs, help="three Gaussian blobs in 3-D",
             recipe="maf", models={"maf": {"layers": 4}}, settings={"epochs": 10})

Then ``pushforward train --data blobs`` trains a 4-layer MAF for 10 epochs.

Entries with ``claims`` stand for files rather than for a name: ``--data path/to/table.csv`` belongs to
the first such entry whose ``claims(value)`` is true (numeric tables, directories of IDX images).

This module imports neither torch nor numpy, so the command line lists the data sets without them.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the registry sits below config.py
    from torch import Tensor

    from ..config import TrainConfig

__all__ = ["KINDS", "Dataset", "DatasetEntry", "describe", "entries", "lookup", "names", "register",
           "unregister"]

#: What an entry's data are: ``toy2d`` (2-D points, float tensors ``(N, 2)``), ``image`` (discrete
#: images, :class:`~pushforward.data.ImageData`, scored in bits/dim), ``table`` (rows of real numbers,
#: float tensors ``(N, D)``).
KINDS = ("toy2d", "image", "table")


@dataclass
class Dataset:
    """Three splits of one data set, as an entry's loader returns them.

    Images are :class:`~pushforward.data.ImageData` (integers in ``[0, levels - 1]``), everything else
    float tensors ``(N, *event_shape)``. ``info`` records how the data were prepared, e.g. the
    training mean and standard deviation used to standardise a table (the reported NLL is in that
    standardised space: ``info["standardised"]``, ``info["mean"]``, ``info["std"]``).
    """

    name: str
    kind: str
    train: Any
    val: Any
    test: Any
    event_shape: tuple[int, ...]
    levels: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.levels is not None


@dataclass(frozen=True)
class DatasetEntry:
    """One registered data set; build it with :func:`register`.

    Attributes:
        name: what ``--data`` takes (for a ``claims`` entry: only its key in the registry).
        kind: one of :data:`KINDS`.
        load: ``load(config) -> Dataset``: the train / validation / test splits for a
            :class:`~pushforward.config.TrainConfig` (``config.data`` is the name or the path;
            ``config.seed`` and the split settings apply), deterministic in ``config.seed``.
        help: one line for ``pushforward --help`` and the docs.
        recipe: the default recipe of :mod:`pushforward.models`.
        models: keyword arguments per recipe (``features`` / ``shape`` come from the data).
        settings: :class:`~pushforward.config.TrainConfig` values that suit the data (batch size,
            epochs, learning rate, ...), below a TOML file and ``--set`` in precedence.
        levels: grey levels of discrete images (``0`` for continuous data).
        classes: number of label classes, the context of ``--condition label`` (``0``: unlabelled).
        dequantizer: default keyword arguments of the variational dequantizer (images).
        log_prob: the true log density ``(N, *event_shape) -> (N,)`` where it is known (toy densities).
        entropy: the true differential entropy in nats where it is known, ``entropy() -> float | None``.
        claims: for entries that stand for files: ``claims(data)`` says whether the ``--data``
            value belongs to this entry (``None``: the entry is chosen by its name).
        metavar: how the help shows what ``--data`` takes (default: the name).
    """

    name: str
    kind: str
    load: Callable[[TrainConfig], Dataset]
    help: str
    recipe: str
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    levels: int = 0
    classes: int = 0
    dequantizer: Mapping[str, Any] = field(default_factory=dict)
    log_prob: Callable[[Tensor], Tensor] | None = None
    entropy: Callable[[], float | None] | None = None
    claims: Callable[[str], bool] | None = None
    metavar: str = ""

    def describe(self) -> str:
        """The help line with what the command line needs to know: kind, grey levels, classes."""
        facts = [self.kind]
        if self.levels:
            facts.append(f"{self.levels} levels")
        if self.classes:
            facts.append(f"{self.classes} classes")
        return f"{self.help} [{', '.join(facts)}; recipe {self.recipe}]"


_ENTRIES: dict[str, DatasetEntry] = {}


def _copy(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    return copy.deepcopy(dict(mapping or {}))  # the caller's dicts stay theirs


def register(name: str, *, kind: str, load: Callable[[TrainConfig], Dataset], help: str, recipe: str,
             models: Mapping[str, Mapping[str, Any]] | None = None, settings: Mapping[str, Any] | None = None,
             levels: int = 0, classes: int = 0, dequantizer: Mapping[str, Any] | None = None,
             log_prob: Callable[[Tensor], Tensor] | None = None,
             entropy: Callable[[], float | None] | None = None,
             claims: Callable[[str], bool] | None = None, metavar: str = "",
             replace: bool = False) -> DatasetEntry:
    """Registers a data set (see :class:`DatasetEntry` for the arguments) and returns its entry.

    Raises:
        ValueError: a name already registered (unless ``replace``), an unknown kind, an image kind
            without ``levels``, an empty help line or recipe, or a negative count.
    """
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"a data set name is one non-empty word, got {name!r}")
    if name in _ENTRIES and not replace:
        raise ValueError(f"data set {name!r} is already registered (pass replace=True to redefine it)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "image" and levels < 2:
        raise ValueError(f"image data set {name!r} needs its number of grey levels (levels >= 2), "
                         f"got {levels}")
    if levels < 0 or classes < 0:
        raise ValueError(f"levels and classes must be non-negative, got {levels} and {classes}")
    if not help.strip() or not recipe:
        raise ValueError(f"data set {name!r} needs a help line and a default recipe")
    if not callable(load):
        raise TypeError(f"load must be a callable load(config) -> Dataset, got {load!r}")
    entry = DatasetEntry(name, kind, load, help.strip(), recipe, _copy(models), _copy(settings), levels,
                         classes, _copy(dequantizer), log_prob, entropy, claims, metavar)
    _ENTRIES[name] = entry
    return entry


def unregister(name: str) -> DatasetEntry:
    """Removes a data set from the registry and returns its entry (tests use it to clean up)."""
    try:
        return _ENTRIES.pop(name)
    except KeyError:
        raise ValueError(f"no data set {name!r} is registered") from None


def entries() -> tuple[DatasetEntry, ...]:
    """Every registered entry, in registration order (named entries and file entries)."""
    return tuple(_ENTRIES.values())


def names(kind: str | None = None) -> list[str]:
    """The names ``--data`` takes (entries that stand for files excluded), optionally of one kind."""
    return [e.name for e in _ENTRIES.values() if e.claims is None and kind in (None, e.kind)]


def lookup(data: str) -> DatasetEntry:
    """The entry for a ``--data`` value: a registered name, else the first file entry that claims it.

    Raises:
        ValueError: nothing matches; the message lists the names and the file forms.
    """
    entry = _ENTRIES.get(data)
    if entry is not None and entry.claims is None:
        return entry
    for entry in _ENTRIES.values():
        if entry.claims is not None and entry.claims(data):
            return entry
    files = [e.metavar or e.name for e in _ENTRIES.values() if e.claims is not None]
    raise ValueError(f"unknown dataset {data!r}: use one of {', '.join(names())}"
                     + (f", or {' or '.join(files)}" if files else ""))


def describe(indent: int = 2, width: int = 100) -> str:
    """The command line's listing: ``NAME  help [kind, levels, classes; recipe]``, wrapped at ``width``."""
    rows = [(e.metavar or e.name, e.describe()) for e in _ENTRIES.values()]
    left = max((len(name) for name, _ in rows), default=0)
    pad = " " * (indent + left + 2)
    return "\n".join(textwrap.fill(f"{' ' * indent}{name:<{left}}  {text}", width, subsequent_indent=pad)
                     for name, text in rows)
