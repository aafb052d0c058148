"""The data sets that ship with pushforward, each one :func:`~pushforward.data.registry.register` call.

The 2-D toy densities (generated from the seed), scikit-learn's digits, Fashion-MNIST, any directory of
IDX images, and numeric tables (CSV, ``.npy``, ``.npz``). The defaults are sized to train well on two
CPU cores in minutes; the small models run faster on one thread than on two (the matrices are too small
to split), so they set ``threads = 1``.

Each loader imports its data module when it is called: listing the data sets (``pushforward --help``)
needs neither torch nor numpy.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import Dataset, register

if TYPE_CHECKING:
    from torch import Tensor

    from ..config import TrainConfig

__all__: list[str] = []

#: One line per toy density (the generative processes are in :mod:`pushforward.data.toy`).
TOY_HELP = {
    "moons": "two interleaved half-moons",
    "circles": "two concentric circles",
    "8gaussians": "a ring of 8 Gaussians",
    "checkerboard": "uniform on the black squares of a 4x4 checkerboard",
    "2spirals": "two interleaved spirals",
    "pinwheel": "a five-armed pinwheel (no closed-form density)",
    "rings": "four concentric rings",
    "swissroll": "a 2-D swiss roll",
}

# 20000 points, 39 steps per epoch: ~1200 steps, about a minute
TOY: dict[str, Any] = {
    "settings": {"batch_size": 512, "lr": 2e-3, "epochs": 30, "warmup_steps": 100, "patience": 10,
                 "threads": 1},
    "recipe": "realnvp",
    "models": {"realnvp": {"layers": 8, "hidden": [128, 128]}, "nice": {"layers": 8, "hidden": [128, 128]}},
}
# MNIST-sized images, ~3 minutes per epoch on 2 cores
IDX_IMAGES: dict[str, Any] = {
    "settings": {"batch_size": 64, "lr": 1e-3, "epochs": 5, "warmup_steps": 500, "patience": 3,
                 "eval_batch_size": 500},
    "recipe": "glow",
    "dequantizer": {"layers": 4, "hidden_channels": 32},
    "models": {
        "glow": {"levels": 2, "steps": 4, "hidden_channels": 64},
        # RealNVP's checkerboard couplings run at full resolution: at hidden 64 x 2 blocks (1.5M
        # parameters) a step cost 18x a glow step on one core (4.6 s), too slow to train in minutes.
        "realnvp_image": {"levels": 2, "hidden_channels": 32, "blocks": 1},
    },
}
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".npy", ".npz")


# -- 2-D toy densities ---------------------------------------------------------------------------------
def toy_splits(config: TrainConfig) -> Dataset:
    """Fresh seeded samples per split: ``n_train`` / ``n_val`` / ``n_test`` points of ``config.data``."""
    from ..train import seed_from
    from .toy import toy_sample

    train, val, test = (toy_sample(config.data, n, seed=seed_from(config.seed, 10 + i))
                        for i, n in enumerate((config.n_train, config.n_val, config.n_test)))
    return Dataset(config.data, "toy2d", train, val, test, (2,), info={"density": config.data})


def _toy_log_prob(name: str, x: Tensor) -> Tensor:
    from .toy import toy_log_prob

    return toy_log_prob(name, x)


def _toy_entropy(name: str) -> float | None:
    from .toy import toy_entropy

    return toy_entropy(name)


for _name, _help in TOY_HELP.items():
    register(_name, kind="toy2d", load=toy_splits, help=_help,
             log_prob=None if _name == "pinwheel" else partial(_toy_log_prob, _name),
             entropy=partial(_toy_entropy, _name), **TOY)


# -- images ----------------------------------------------------------------------------------------------
def digits_splits(config: TrainConfig) -> Dataset:
    """The fixed 1437/180/180 split of :func:`pushforward.data.load_digits`."""
    from .images import load_digits

    train, val, test = (load_digits(s) for s in ("train", "val", "test"))
    return Dataset("digits", "image", train, val, test, tuple(train.images.shape[1:]), train.levels,
                   info={"split": "fixed 1437/180/180 split of pushforward.data.load_digits"})


def fashion_mnist_splits(config: TrainConfig) -> Dataset:
    """5000 random training images (seeded) for validation; the official test set."""
    from .images import load_fashion_mnist, split_off

    train, val = split_off(load_fashion_mnist("train"), 5000, seed=config.seed)
    test = load_fashion_mnist("test")
    return Dataset("fashion-mnist", "image", train, val, test, tuple(train.images.shape[1:]), train.levels,
                   info={"split": "5000 random training images for validation; the official test set"})


def is_directory(data: str) -> bool:
    """``--data DIR``: a directory is read as IDX images."""
    return Path(data).is_dir()


def idx_splits(config: TrainConfig) -> Dataset:
    """IDX files: ``val_fraction`` of the training images (seeded) for validation; the test set."""
    from .images import load_idx_dir, split_off

    directory = Path(config.data)
    full = load_idx_dir(directory, "train")
    n_val = max(1, round(config.val_fraction * len(full)))
    train, val = split_off(full, n_val, seed=config.seed)
    test = load_idx_dir(directory, "test")
    return Dataset(directory.name, "image", train, val, test, tuple(train.images.shape[1:]), train.levels,
                   info={"split": f"{n_val} random training images for validation; the directory's test set"})


# digits: 1437 images, 22 steps per epoch: ~1300 steps, 2-3 minutes.
# realnvp_image reached 2.02 test bits/dim where this glow reached 2.09 in the same 1200 steps.
register("digits", kind="image", load=digits_splits, levels=17, classes=10,
         help="scikit-learn's 1797 handwritten digits, 8x8 (a fixed 1437/180/180 split)",
         settings={"batch_size": 64, "lr": 1e-3, "epochs": 60, "warmup_steps": 200, "patience": 20,
                   "threads": 1},
         recipe="realnvp_image", dequantizer={"layers": 4, "hidden_channels": 16},
         models={"glow": {"levels": 2, "steps": 4, "hidden_channels": 48},
                 "realnvp_image": {"levels": 2, "hidden_channels": 32, "blocks": 1}})
register("fashion-mnist", kind="image", load=fashion_mnist_splits, levels=256, classes=10,
         help="Fashion-MNIST, 28x28 (apt-get install dataset-fashion-mnist)", **IDX_IMAGES)
register("idx", kind="image", load=idx_splits, levels=256, classes=10, metavar="DIR/",
         claims=is_directory,
         help="a directory of MNIST-style IDX files: train-/t10k-images-idx3-ubyte[.gz] and the labels",
         **IDX_IMAGES)


# -- tables ----------------------------------------------------------------------------------------------
def is_table_file(data: str) -> bool:
    """``--data FILE``: a name ending in .csv, .tsv, .txt, .npy or .npz, or any existing file."""
    return data.lower().endswith(TABLE_SUFFIXES) or Path(data).is_file()


def table_splits(config: TrainConfig) -> Dataset:
    """A seeded split by ``val_fraction`` / ``test_fraction``, standardised with the training statistics.

    Constant columns are dropped (with a warning); columns on a grid are recorded in ``info`` (their
    steps in standardised units), which :func:`~pushforward.data.tabular.table_objective` dequantizes.
    Settings left as "sized to the table" (``-1``, model arguments ``"auto"``) are filled in from
    the number of training rows (:func:`~pushforward.data.tabular.sized_defaults`).
    """
    from .tabular import apply_sized_defaults, load_table

    fractions = (1 - config.val_fraction - config.test_fraction, config.val_fraction, config.test_fraction)
    table = load_table(config.data, split=fractions, seed=config.seed)
    apply_sized_defaults(config, len(table.train), table.dim)
    steps = table.steps.tolist() if table.steps is not None else [0.0] * table.dim
    info = {"standardised": True, "mean": table.mean.tolist(), "std": table.std.tolist(),
            "columns": table.columns, "dropped": table.dropped, "grid_steps": steps,
            "note": "NLL is reported in the standardised space (training-set mean and std)"}
    grid = table.grid_columns
    notes = []
    if grid and config.dequantization != "none":
        notes.append(f"{len(grid)} of {table.dim} columns lie on a grid and are dequantized with uniform "
                     f"noise of one grid step (the NLL is a bound on their discrete values; turn off with "
                     f"--set dequantization=none): {', '.join(grid)}")
    elif grid:
        notes.append(f"{len(grid)} columns lie on a grid but dequantization=none: their NLL is a density on "
                     f"a grid, unbounded below: {', '.join(grid)}")
    if table.dropped:
        notes.append(f"dropped {len(table.dropped)} constant column(s): {', '.join(table.dropped)}")
    info["notes"] = notes
    return Dataset(Path(config.data).stem, "table", table.train, table.val, table.test, (table.dim,),
                   info=info)


# density estimation on tables: the full-covariance Gaussian, then autoregressive splines (models.tabular);
# -1 and "auto": sized to the number of training rows (data.tabular.sized_defaults)
register("table", kind="table", load=table_splits, metavar="FILE.csv|.npy|.npz",
         claims=is_table_file,
         help="a numeric table, standardised with the training rows' mean and std; columns on a grid "
              "are dequantized; the model starts at the full-covariance Gaussian",
         settings={"batch_size": 256, "lr": 1e-3, "max_steps": -1, "val_every": -1, "warmup_steps": 100,
                   "weight_decay": -1, "patience": 20, "val_at_start": True},
         recipe="tabular", models={"tabular": {"layers": "auto", "hidden": "auto", "gaussian_at": "auto",
                                               "shrinkage": "ledoit-wolf"},
                                   "nsf": {"layers": 5, "hidden": [128, 128], "bins": 8},
                                   "realnvp": {"layers": 8, "hidden": [128, 128]},
                                   "nice": {"layers": 8, "hidden": [128, 128]}})
