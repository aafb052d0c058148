"""Training configuration: one dataclass, per-dataset defaults, TOML files and ``--set`` overrides.

Precedence, lowest first: the dataclass defaults, the defaults of the chosen dataset (its entry in
:mod:`pushforward.data.registry`: settings, recipe, recipe arguments), the TOML file, then
command-line overrides. A key that is not a field
of :class:`TrainConfig` (a typo) is an error that lists the valid keys.

A TOML file looks like::

    data = "moons"
    recipe = "realnvp"
    batch_size = 512
    epochs = 30

    [model]            # keyword arguments of the recipe (features / shape come from the data)
    layers = 8
    hidden = [128, 128]
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.registry import DatasetEntry, entries, lookup
from .options import check_key, check_recipe_kwargs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

__all__ = [
    "TrainConfig",
    "check_config",
    "config_from_dict",
    "context_classes",
    "dataset_entry",
    "default_run_dir",
    "load_toml",
    "merge",
    "model_kwargs",
    "parse_overrides",
    "resolve_config",
    "resume_changes",
]

CONDITIONS = ("", "label")
DEQUANTIZATIONS = ("uniform", "variational", "none")
#: Training objectives by name (the same as :data:`pushforward.objectives.OBJECTIVES`).
OBJECTIVES = ("nll", "flow-matching", "ot-flow-matching")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``0`` (or ``""``) means "not set" for the optional limits.

    Attributes:
        data: a registered data set (:func:`pushforward.data.names`: ``moons``, ``8gaussians``, ...,
            ``digits``, ``fashion-mnist``), a path to a table (CSV, ``.npy``, ``.npz``) or a directory
            of IDX images.
        recipe: a recipe of :mod:`pushforward.models` (``""``: the dataset's default).
        model: keyword arguments of the recipe; ``features`` / ``shape`` are filled in from the data.
        batch_size: training batch size; under ``torchrun`` the **global** batch, split evenly over
            the processes (so it must be divisible by their number) and giving the same updates.
        eval_batch_size: batch size for validation and evaluation.
        lr: peak learning rate of Adam.
        lr_min: final learning rate of the cosine decay, as a fraction of ``lr``.
        warmup_steps: linear warm-up from 0 to ``lr`` over this many steps.
        weight_decay: Adam's L2 penalty on every parameter (``-1``: sized to the table, for tables; ``0``
            elsewhere).
        epochs: number of passes over the training set (ignored when ``max_steps`` is set).
        max_steps: total optimizer steps (``0``: ``epochs`` decides); the cosine runs over this total.
        max_minutes: wall-clock budget of one invocation (``0``: none); the run validates, saves and
            stops cleanly at it. The learning-rate schedule still follows ``epochs`` / ``max_steps``,
            so for a cosine that ends on time choose ``max_steps`` to fit (``pushforward demo`` times
            a few steps to do so).
        clip: gradient-norm clipping threshold (``0``: no clipping).
        ema: decay of an exponential moving average of the weights (e.g. ``0.999``; ``0``: none), updated
            after every step with the decay ``min(ema, (1 + t) / (10 + t))`` at step ``t``; validation,
            the best weights (saved, sampled, evaluated) and the end of training use the average.
        noise: standard deviation of Gaussian noise added to the (dequantized) training data
            (:class:`~pushforward.objectives.NoiseAugmentation`; ``0``: none). Validation and evaluation
            score the clean data; ``pushforward sample`` denoises with one step along the model's score.
        label_drop: with ``condition = "label"``, the probability of replacing a training example's
            one-hot label by zeros, the null label that classifier-free guidance contrasts with
            (``pushforward sample --guidance W``).
        patience: stop after this many validations without improvement (``0``: never).
        val_every: validate every this many steps (``0``: at the end of each epoch).
        val_at_start: also validate before the first step, so the starting weights are a candidate for
            the best ones: a model that starts at a fitted baseline (a table's full-covariance Gaussian)
            then ends no worse than it on the validation set. On by default for tables.
        seed: seeds the model initialisation, the data split, the shuffling and the dequantization.
        run_dir: where checkpoints, metrics and plots go (``""``: ``runs/<data>``).
        device: ``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``;
            under ``torchrun`` ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``.
        threads: torch CPU threads (``0``: torch's default).
        n_train / n_val / n_test: sample counts for the 2-D toy densities.
        val_fraction / test_fraction: split fractions for tables (and digits).
        max_train: use at most this many training examples (``0``: all); handy for quick runs.
        progress: show a tqdm progress bar.
        restore_best: load the best validation weights into the flow when training ends.
        condition: ``""`` (an unconditional model) or ``"label"``: image models of ``p(x | label)``
            with the one-hot label as ``context`` (``context_features`` = number of classes).
        dequantization: for images, ``"uniform"`` noise or a ``"variational"`` dequantizer
            ``q(u | x)`` (Flow++) trained jointly with the flow; the reported bits/dim is then
            the bound ``E_q[-log p(y) + log q(u | x)] + D log K`` in the same formula. For tables,
            ``"uniform"`` dequantizes the columns that lie on a grid and ``"none"`` leaves them as they are.
        dequantizer: keyword arguments of the variational dequantizer (``layers``, ``hidden_channels``).
        objective: what training minimises: ``"nll"`` (the likelihood, or its dequantization bound) or,
            for continuous normalizing flows (``cnf``, ``cnf_image``), ``"flow-matching"`` /
            ``"ot-flow-matching"`` (:class:`~pushforward.objectives.FlowMatching`, no ODE solve in
            training; validation figures are its loss, evaluation is the likelihood by the ODE).
        amp: bf16 autocast in the conditioner networks; the transforms, their log-determinants, the
            base density and the loss stay float32. Meant for GPUs; allowed on the CPU (where it is
            usually slower), refused on MPS.
        compile: train through ``torch.compile`` of the log-density (ActNorm is initialised eagerly first).
        checkpoint_grads: gradient checkpointing: recompute each layer's activations in the backward
            pass instead of storing them (less memory for deep image flows, about one more forward).
    """

    data: str = "moons"
    recipe: str = ""
    model: dict = field(default_factory=dict)
    batch_size: int = 256
    eval_batch_size: int = 1024
    lr: float = 1e-3
    lr_min: float = 0.01
    warmup_steps: int = 100
    weight_decay: float = 0.0
    epochs: int = 20
    max_steps: int = 0
    max_minutes: float = 0.0
    clip: float = 10.0
    ema: float = 0.0
    noise: float = 0.0
    label_drop: float = 0.0
    patience: int = 10
    val_every: int = 0
    val_at_start: bool = False
    seed: int = 0
    run_dir: str = ""
    device: str = "auto"
    threads: int = 0
    n_train: int = 20000
    n_val: int = 5000
    n_test: int = 5000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train: int = 0
    progress: bool = True
    restore_best: bool = True
    condition: str = ""
    dequantization: str = "uniform"
    dequantizer: dict = field(default_factory=dict)
    objective: str = "nll"
    amp: bool = False
    compile: bool = False
    checkpoint_grads: bool = False

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS} ('' = unconditional), "
                             f"got {self.condition!r}")
        if self.dequantization not in DEQUANTIZATIONS:
            raise ValueError(f"dequantization must be one of {DEQUANTIZATIONS}, got {self.dequantization!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / Path(self.data).stem


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(name: str, value: Any) -> Any:
    """``value`` as the type of field ``name``, in its range (:data:`pushforward.options.CONFIG_RULES`)."""
    return check_key(name, value)


def check_config(config: TrainConfig, recipe: bool = True) -> TrainConfig:
    """Checks every key of ``config`` against its rule (:mod:`pushforward.options`), the keys that
    must agree (the split fractions; a recipe for the data's kind) and, with ``recipe``, ``model.*``
    and ``dequantizer.*`` against the recipe's signature. Returns ``config``.

    Raises:
        ValueError: naming the key, the value and what is allowed.
    """
    for f in dataclasses.fields(TrainConfig):
        check_key(f.name, getattr(config, f.name))
    if config.val_fraction + config.test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction = {config.val_fraction} + {config.test_fraction} "
                         "leaves no training data; their sum must be below 1")
    if not recipe or not config.recipe:
        return config
    try:
        entry = lookup(str(config.data))
    except ValueError:
        entry = None  # reported when the data are loaded
    params = _params(config.recipe) if config.recipe in _recipes() else {}
    if params and not {"features", "shape", "event_shape"} & set(params):
        data_recipes = [r for r in _recipes() if {"features", "shape", "event_shape"} & set(_params(r))]
        hint = "; for a variational dequantizer use --dequantization variational" if "flow" in params else ""
        raise ValueError(f"recipe {config.recipe!r} does not model data on its own{hint}; the recipes: "
                         f"{', '.join(data_recipes)}")
    if entry is not None and (("shape" in params and entry.kind != "image")
                              or ("features" in params and entry.kind == "image")):
        want = "shape" if entry.kind == "image" else "features"
        suitable = [r for r in _recipes() if want in _params(r) or "event_shape" in _params(r)]
        kinds = {"image": "images (C, H, W)", "toy2d": "2-D points", "table": "rows of a table"}
        models = "images" if "shape" in params else "vectors"
        raise ValueError(f"recipe {config.recipe!r} models {models}, but "
                         f"{config.data!r} holds {kinds.get(entry.kind, entry.kind)}; its recipes: "
                         f"{', '.join(suitable)}")
    check_recipe_kwargs(config.recipe, config.model, "model", conditional=config.condition == "label")
    if config.dequantization == "variational":
        check_recipe_kwargs("dequantized", config.dequantizer, "dequantizer")
    return config


def _recipes() -> dict[str, Any]:
    from .models import RECIPES

    return RECIPES


def _params(recipe: str) -> Mapping[str, inspect.Parameter]:
    fn = _recipes()[recipe]
    return inspect.signature(getattr(fn, "__wrapped__", fn)).parameters


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Builds a :class:`TrainConfig`; unknown keys are an error that lists the valid ones."""
    valid = _field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys are: {', '.join(valid)}"
        )
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a TOML config file into a plain dict (keys are checked by :func:`config_from_dict`)."""
    if tomllib is None:  # pragma: no cover
        raise ImportError("reading TOML on Python 3.10 needs tomli: pip install tomli")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from e


def _parse_value(text: str) -> Any:
    """A TOML value if ``text`` parses as one (``3``, ``1e-3``, ``true``, ``[64, 64]``), else the string."""
    if tomllib is not None:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Turns ``["lr=3e-4", "model.hidden=[64,64]"]`` into a nested dict."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        value = _parse_value(text.strip())
        if "." in key:
            head, sub = key.split(".", 1)
            if head not in ("model", "dequantizer"):
                raise ValueError(f"only model.<kwarg> and dequantizer.<kwarg> may be dotted in --set, "
                                 f"got {key!r}")
            out.setdefault(head, {})[sub] = value
        else:
            out[key] = value
    return out


def merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, nested dicts (``model``, ``dequantizer``) merged key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: The keys that define what a run trains on and what it trains: a resumed run keeps them.
FIXED_ON_RESUME = ("data", "recipe", "model", "condition", "dequantization", "dequantizer", "objective",
                   "seed", "n_train", "n_val", "n_test", "val_fraction", "test_fraction", "max_train",
                   "batch_size")


def same_data(a: str, b: str) -> bool:
    """Whether two ``data`` values name the same data set (a file given by two paths included)."""
    if a == b:
        return True
    try:
        return lookup(a).claims is not None and Path(a).resolve() == Path(b).resolve()
    except ValueError:
        return False


def resume_changes(recorded: TrainConfig, given: TrainConfig) -> list[str]:
    """``"key = old -> new"`` for every key of :data:`FIXED_ON_RESUME` that ``given`` changes."""
    changes = []
    for key in FIXED_ON_RESUME:
        old, new = getattr(recorded, key), getattr(given, key)
        if key == "data" and same_data(str(old), str(new)):
            continue
        if old != new:
            changes.append(f"{key} = {old!r} -> {new!r}")
    return changes


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<data>``, followed by what sets the run apart from the data set's default run: another
    recipe, ``label`` for a class-conditional model, another dequantization (``runs/digits-vae``,
    ``runs/digits-variational``, ``runs/fashion-mnist-label``), so that different runs of one data set
    do not meet in one directory."""
    parts = [Path(str(config.data)).stem or "run"]
    try:
        if config.recipe and config.recipe != lookup(str(config.data)).recipe:
            parts.append(config.recipe)
    except ValueError:
        pass
    if config.condition:
        parts.append(config.condition)
    if config.dequantization != "uniform":
        parts.append(config.dequantization)
    return Path("runs") / "-".join(parts)


def dataset_entry(config: TrainConfig) -> DatasetEntry:
    """The registry entry of ``config.data`` (:func:`pushforward.data.lookup`)."""
    return lookup(str(config.data))


def resolve_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Applies, in order: dataclass defaults, the data set's defaults, the TOML values, the overrides."""
    user = merge(file_values or {}, overrides or {})
    config_from_dict(user)  # reports typos before anything else
    entry = lookup(str(user.get("data", TrainConfig.data)))
    recipe = user.get("recipe") or entry.recipe
    defaults = copy.deepcopy({**entry.settings, "recipe": recipe, "model": entry.models.get(recipe, {})})
    if entry.dequantizer:
        defaults["dequantizer"] = copy.deepcopy(dict(entry.dequantizer))
    try:
        config_from_dict(defaults)
    except ValueError as e:
        raise ValueError(f"the registered defaults of data set {entry.name!r} are not valid: {e}") from None
    config = config_from_dict(merge(defaults, user))
    if entry.claims is not None and Path(config.data).exists():  # a file: recorded to resolve anywhere
        config.data = str(Path(config.data).resolve())
    return check_config(config)


def context_classes(config: TrainConfig) -> int:
    """Number of classes whose one-hot label is the context (``0``: an unconditional model).

    ``config.model["context_features"]`` when given, else the data set's number of classes
    (its registry entry's ``classes``).

    Raises:
        ValueError: ``condition = "label"`` for data without labels (toy densities, tables).
    """
    if config.condition != "label":
        return 0
    if "context_features" in config.model:
        return int(config.model["context_features"])
    classes = dataset_entry(config).classes
    if not classes:
        labelled = ", ".join(e.metavar or e.name for e in entries() if e.classes)
        raise ValueError(f"condition = 'label' needs labelled data ({labelled}); "
                         f"{config.data!r} has no labels")
    return int(classes)


def model_kwargs(config: TrainConfig, event_shape: tuple[int, ...]) -> dict[str, Any]:
    """The recipe's keyword arguments: ``config.model`` plus ``features`` or ``shape`` from the data,
    and ``context_features`` (the number of classes) for a class-conditional model.

    Raises:
        ValueError: for an unknown recipe or a keyword the recipe does not take (listing the valid ones).
    """
    from .models import RECIPES

    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; known recipes: {', '.join(sorted(RECIPES))}")
    fn = RECIPES[config.recipe]
    params = inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
    kwargs = dict(config.model)
    if "features" in params and len(event_shape) != 1:
        raise ValueError(f"recipe {config.recipe!r} models vectors, but the data has event shape "
                         f"{event_shape}")
    if "shape" in params and len(event_shape) != 3:
        raise ValueError(f"recipe {config.recipe!r} models images (C, H, W), "
                         f"but the data has event shape {event_shape}")
    check_recipe_kwargs(config.recipe, kwargs, "model", conditional=config.condition == "label")
    if "features" in params:
        kwargs["features"] = event_shape[0]
    elif "shape" in params:
        kwargs["shape"] = list(event_shape)
    elif "event_shape" in params:  # recipes for any data, e.g. pushforward.vae.vae
        kwargs["event_shape"] = list(event_shape)
    classes = context_classes(config)
    if classes:
        if "context_features" not in params:
            raise ValueError(f"recipe {config.recipe!r} takes no context, so it cannot be class-conditional")
        kwargs["context_features"] = classes
    return kwargs
