"""Parameters of the toy densities and their isotropic gaussian-mixture representation.

The generative processes are documented in :mod:`pushforward.data.toy`. Every density
except pinwheel and checkerboard is a finite (8gaussians) or continuous (noisy curves)
mixture of isotropic gaussians sharing one sigma; continuous mixtures over a curve
parameter are discretised here with composite 4-point Gauss-Legendre quadrature, with
panels spanning at most one sigma of arc length and geometric refinement at the curve
ends (absolute error in log p about 1e-6 where the density is not negligible).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

PI = math.pi
F64 = torch.float64


@dataclass(frozen=True)
class _Curve:
    """One component of a "noisy curve" density: x = mu(s) + sigma * eps, s ~ rho.

    ``sample_s`` maps ``u ~ U[0, 1)`` to ``s`` (inverse CDF); ``rho`` is the density
    of ``s`` on ``[lo, hi]``, used for the quadrature in :func:`toy_log_prob`.
    """

    weight: float
    lo: float
    hi: float
    mu: Callable[[Tensor], Tensor]
    sample_s: Callable[[Tensor], Tensor]
    rho: Callable[[Tensor], Tensor]


def _uniform(lo: float, hi: float) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    return (lambda u: lo + (hi - lo) * u), (lambda s: torch.full_like(s, 1.0 / (hi - lo)))


def _polar(radius: float) -> Callable[[Tensor], Tensor]:
    return lambda t: radius * torch.stack([torch.cos(t), torch.sin(t)], dim=-1)


def _moon(sign: float) -> Callable[[Tensor], Tensor]:
    return lambda s: sign * 2.0 * torch.stack([torch.cos(s) - 0.5, torch.sin(s) - 0.25], dim=-1)


def _spiral(sign: float) -> Callable[[Tensor], Tensor]:
    return lambda th: sign * (th / PI).unsqueeze(-1) * torch.stack([-torch.cos(th), torch.sin(th)], dim=-1)


def _swissroll(t: Tensor) -> Tensor:
    return t.unsqueeze(-1) * torch.stack([torch.cos(t), torch.sin(t)], dim=-1) / 5.0


def curves(name: str) -> tuple[list[_Curve], float] | None:
    """Return ``(components, sigma)`` for the densities built from noisy curves."""
    if name == "moons":
        su, rho = _uniform(0.0, PI)
        return [_Curve(0.5, 0.0, PI, _moon(s), su, rho) for s in (1.0, -1.0)], 0.1
    if name == "circles":
        su, rho = _uniform(0.0, 2 * PI)
        return [_Curve(0.5, 0.0, 2 * PI, _polar(r), su, rho) for r in (1.0, 2.0)], 0.1
    if name == "rings":
        su, rho = _uniform(0.0, 2 * PI)
        return [_Curve(k / 10, 0.0, 2 * PI, _polar(0.75 * k), su, rho) for k in (1, 2, 3, 4)], 0.08
    if name == "2spirals":
        top = 3 * PI

        def sample_th(u: Tensor) -> Tensor:
            return top * torch.sqrt(u)

        def rho_th(th: Tensor) -> Tensor:
            return 2 * th / top**2

        return [_Curve(0.5, 0.0, top, _spiral(s), sample_th, rho_th) for s in (1.0, -1.0)], 0.1
    if name == "swissroll":
        su, rho = _uniform(1.5 * PI, 4.5 * PI)
        return [_Curve(1.0, 1.5 * PI, 4.5 * PI, _swissroll, su, rho)], 0.15
    return None


EIGHT_G_RADIUS = 2 * math.sqrt(2)
EIGHT_G_STD = math.sqrt(2) / 4


def eight_gaussian_centres() -> Tensor:
    k = torch.arange(8, dtype=F64) * (PI / 4)
    return EIGHT_G_RADIUS * torch.stack([torch.cos(k), torch.sin(k)], dim=-1)


def checker_corners() -> Tensor:
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    return torch.tensor([(-4.0 + 2 * i, -4.0 + 2 * j) for i, j in cells], dtype=F64)


_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(4))
_PRUNE_K2 = 40.0  # dropped mixture terms are < exp(-40) times the largest one
_PANELS_PER_SIGMA = 1.05  # panels per sigma of arc length (at the curve's fastest point)
_END_REFINE = 12  # geometric refinement levels at each end of a curve


@cache
def mixture(name: str) -> tuple[Tensor, Tensor, float] | None:
    """``(centres (M, 2), log_weights (M,), sigma)`` of the gaussian mixture, or None."""
    if name == "8gaussians":
        return eight_gaussian_centres(), torch.full((8,), -math.log(8), dtype=F64), EIGHT_G_STD
    spec = curves(name)
    if spec is None:
        return None
    comps, sigma = spec
    centres, log_w = [], []
    for c in comps:
        fine = c.mu(torch.linspace(c.lo, c.hi, 20_001, dtype=F64))
        arc_bound = (fine.diff(dim=0).norm(dim=-1).max() * 20_000).item()  # max speed * length
        edges = torch.linspace(
            c.lo, c.hi, dtype=F64, steps=max(2, math.ceil(_PANELS_PER_SIGMA * arc_bound / sigma)) + 1
        )
        # Far from the curve, beyond an endpoint, the integrand in s decays on a scale much
        # shorter than sigma: refine the two end panels geometrically.
        ratios = 2.0 ** -torch.arange(1, _END_REFINE + 1, dtype=F64)
        first, last = edges[1] - edges[0], edges[-1] - edges[-2]
        edges = torch.cat([edges, edges[0] + first * ratios, edges[-1] - last * ratios]).sort().values
        mids, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
        s = (mids[:, None] + half[:, None] * _GL_X[None, :]).reshape(-1)
        w = (half[:, None] * _GL_W[None, :]).reshape(-1)
        centres.append(c.mu(s))
        log_w.append(torch.log(c.weight * c.rho(s) * w))
    return torch.cat(centres), torch.cat(log_w), sigma


def mixture_log_prob(x: Tensor, centres: Tensor, log_w: Tensor, sigma: float) -> Tensor:
    """Log density of an isotropic gaussian mixture at finite 2-D points ``x``.

    Points are grouped into square cells of side ``4 sigma``; for each cell only the
    centres that can matter for some point of the cell are kept (a dropped term is at
    most ``exp(-40)`` times the largest term for every point of the cell).
    """
    out = torch.empty(x.shape[0], dtype=F64)
    if x.shape[0] == 0:
        return out
    keys = torch.floor((x / (4 * sigma)).clamp(-1e9, 1e9)).long()
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse)
    # Bounding box of the points of each cell (vectorised once, then used cell by cell).
    index = inverse[:, None].expand(-1, 2)
    lows = torch.full((counts.shape[0], 2), math.inf, dtype=F64).scatter_reduce(0, index, x, "amin")
    highs = torch.full((counts.shape[0], 2), -math.inf, dtype=F64).scatter_reduce(0, index, x, "amax")
    norm = -math.log(2 * PI * sigma**2)
    slack = 2 * _PRUNE_K2 * sigma**2
    n_cells, step = counts.shape[0], max(1, 2**22 // centres.shape[0])
    sizes = counts.tolist()
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    for c0 in range(0, n_cells, step):
        lo, hi = lows[c0 : c0 + step, None, :], highs[c0 : c0 + step, None, :]
        d_near = ((lo - centres).clamp_min(0) + (centres - hi).clamp_min(0)).pow(2).sum(-1)
        d_far = torch.maximum((centres - lo).abs(), (centres - hi).abs()).pow(2).sum(-1)
        keep = d_near <= d_far.min(dim=1, keepdim=True).values + slack
        for cell in range(c0, min(c0 + step, n_cells)):
            idx = order[starts[cell] : starts[cell] + sizes[cell]]
            sel = keep[cell - c0].nonzero().squeeze(1)
            diff = x[idx, None, :] - centres[None, sel, :]
            d2 = diff[..., 0].square() + diff[..., 1].square()
            out[idx] = torch.logsumexp(log_w[sel] - d2 / (2 * sigma**2), dim=-1) + norm
    return out
