"""Evaluation metrics: bits per dimension for dequantized discrete data, mean +- stderr."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["bits_per_dim", "mean_and_stderr"]

_Num = TypeVar("_Num", float, Tensor)


def bits_per_dim(nll_nats: _Num, dims: int, levels: int) -> _Num:
    """Bits per dimension of discrete data from the NLL of its dequantized version.

    Computes exactly ``(nll_nats + D * ln(levels)) / (D * ln 2)``, where ``nll_nats`` is
    ``-log p(y)`` (in nats, per example) of the dequantized data
    ``y = (x_int + u) / levels`` in ``[0, 1]^D``, ``u ~ U[0, 1)^D``.

    Why this is an upper bound on the discrete code length: the model assigns the integer
    image ``x`` the probability ``P(x) = int over its cell of p(y) dy``, the cell being a cube
    of volume ``levels^-D``. Writing this as ``levels^-D * E_u[p(y)]`` and applying Jensen's
    inequality, ``-log P(x) <= E_u[-log p(y)] + D ln(levels)``. Dividing by ``D ln 2``
    converts nats to bits per dimension. (The ``+ D ln(levels)`` is the log-Jacobian of
    the rescaling by ``1 / levels``; for data dequantized as ``x_int + u`` without
    rescaling the term would be 0.)

    Args:
        nll_nats: Negative log-likelihood of ``y`` in nats per example (float or tensor).
        dims: Dimensionality ``D`` of one example (e.g. 784 for 1x28x28).
        levels: Number of discrete levels per dimension (e.g. 256).

    Returns:
        Bits per dimension, of the same kind as ``nll_nats`` (elementwise for tensors).

    References:
        Theis, van den Oord & Bethge, "A note on the evaluation of generative models", 2016;
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, section 4.1.
    """
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    return (nll_nats + dims * math.log(levels)) / (dims * math.log(2.0))


def mean_and_stderr(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)``, as Python floats.

    All elements are used (the tensor is flattened); computed in float64. With a single
    value the standard error is ``nan``.

    Raises:
        ValueError: If ``values`` is empty.
    """
    v = torch.as_tensor(values).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    n = v.numel()
    if n == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    mean = v.mean().item()
    stderr = (v.std(correction=1) / math.sqrt(n)).item() if n > 1 else math.nan
    return mean, stderr
