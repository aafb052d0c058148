"""Data sets: 2-D toy densities, numeric tables and discrete images."""

from .images import (
    FASHION_MNIST_ROOT,
    ImageData,
    dequantize,
    load_digits,
    load_fashion_mnist,
    load_idx_dir,
    read_idx,
    split_off,
)
from .tabular import TabularData, load_table, read_table
from .toy import TOY_DENSITIES, toy_entropy, toy_log_prob, toy_sample

__all__ = [
    "FASHION_MNIST_ROOT",
    "TOY_DENSITIES",
    "ImageData",
    "TabularData",
    "dequantize",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_table",
    "read_idx",
    "read_table",
    "split_off",
    "toy_entropy",
    "toy_log_prob",
    "toy_sample",
]
