"""The registry's case type, shared by registry.py and the family files."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    context: int = 0  # context features, 0 = none
    unit_interval: bool = False  # inputs must lie in (0, 1)
    circle: bool = False  # inputs are angles in [-pi, pi)

    def data(self, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(seed)
        if self.unit_interval:
            x = torch.rand(n, *self.shape, generator=g, dtype=torch.float64) * 0.9 + 0.05
        elif self.circle:
            x = (torch.rand(n, *self.shape, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
        else:
            x = torch.randn(n, *self.shape, generator=g, dtype=torch.float64)
        c = torch.randn(n, self.context, generator=g, dtype=torch.float64) if self.context else None
        return x, c

    def make(self, seed: int = 0) -> torch.nn.Module:
        """Builds, initialises on data, and perturbs all parameters (deterministically)."""
        torch.manual_seed(seed)
        t = self.build().double()
        x, c = self.data(8, seed=seed + 100)
        with torch.no_grad():
            t(x, c)  # ActNorm data-dependent initialisation
            g = torch.Generator().manual_seed(seed + 1)
            for p in t.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return t
