"""The monotonic rational-quadratic spline kernel (neural spline flows).

On ``[-B, B]`` the map is a monotone piecewise rational-quadratic with ``K`` bins; outside it is
the identity (linear tails), so inputs anywhere on the real line are valid. All elements are
computed on clamped inputs and the tails selected with ``torch.where``: no boolean indexing (so it
compiles without graph breaks) and no NaN values or gradients for inputs far outside the range.

The circular kernel is the same spline on ``[-pi, pi]`` with equal derivatives at both ends, followed
by a rotation: a diffeomorphism of the circle, for angles.

References:
    Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", 2019.
    Gregory & Delbourgo, "Piecewise rational quadratic interpolation to monotonic data", 1982.
    Rezende, Papamakarios, Racaniere, Albergo, Kanwar, Shanahan & Cranmer, "Normalizing Flows on Tori and
    Spheres", 2020 (circular splines).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import validation_enabled

__all__ = ["CircularSplineKernel", "SplineKernel"]


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx).squeeze(-1)


def _bin(knots: Tensor, v: Tensor) -> Tensor:
    # index of the bin holding v: number of interior knots <= v (comparisons, no search, no masks)
    return (v[..., None] >= knots[..., 1:-1]).sum(-1, keepdim=True)


def _rq_forward(xc: Tensor, xk: Tensor, w: Tensor, yk: Tensor, h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The spline at ``xc`` (inside the knots) and its log-derivative.

    Knots ``(*, K + 1)``, bin sizes ``(*, K)``, derivatives at the knots ``(*, K + 1)``.
    """
    i = _bin(xk, xc)
    x0, wi, y0, hi = _gather(xk, i), _gather(w, i), _gather(yk, i), _gather(h, i)
    d0, d1 = _gather(d, i), _gather(d, i + 1)
    s = hi / wi
    xi = ((xc - x0) / wi).clamp(0, 1)
    t = xi * (1 - xi)
    denom = s + (d1 + d0 - 2 * s) * t
    y = y0 + hi * (s * xi.square() + d0 * t) / denom
    logd = (2 * torch.log(s) + torch.log(d1 * xi.square() + 2 * s * t + d0 * (1 - xi).square())
            - 2 * torch.log(denom))
    return y, logd


def _rq_inverse(yc: Tensor, xk: Tensor, w: Tensor, yk: Tensor, h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse spline at ``yc`` (a root of a quadratic) and the inverse's log-derivative."""
    i = _bin(yk, yc)
    x0, wi, y0, hi = _gather(xk, i), _gather(w, i), _gather(yk, i), _gather(h, i)
    d0, d1 = _gather(d, i), _gather(d, i + 1)
    s = hi / wi
    dy = yc - y0
    c2 = d1 + d0 - 2 * s
    a = hi * (s - d0) + dy * c2
    b = hi * d0 - dy * c2
    c = -s * dy
    disc = (b.square() - 4 * a * c).clamp_min(0)
    xi = ((2 * c) / (-b - disc.sqrt())).clamp(0, 1)
    x = x0 + xi * wi
    t = xi * (1 - xi)
    denom = s + c2 * t
    logd = (2 * torch.log(s) + torch.log(d1 * xi.square() + 2 * s * t + d0 * (1 - xi).square())
            - 2 * torch.log(denom))
    return x, -logd


class SplineKernel:
    """Rational-quadratic spline kernel: ``bins`` bins on ``[-tail_bound, tail_bound]``, linear tails outside.

    Parameters per element: ``3 * bins - 1`` (bin widths, bin heights, interior derivatives), laid
    out as ``params`` blocks along the split dimension like every kernel. At ``params = 0`` the
    spline is exactly the identity (equal bins, unit derivatives).

    Args:
        bins: number of bins ``K``.
        tail_bound: half-width ``B`` of the spline's interval; outside it the kernel is the identity
            (nflows' ``tail_bound``).
        min_width: floor on each bin's width, as a fraction of the interval (``min_width * bins < 1``).
        min_height: floor on each bin's height, as a fraction of the interval (``min_height * bins < 1``).
        min_derivative: floor on the derivatives at the interior knots (keeps slopes away from zero).

    Raises:
        ValueError: If ``bins < 1``, ``tail_bound <= 0``, ``min_width * bins >= 1`` or
            ``min_height * bins >= 1``.

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", 2019.
    """

    def __init__(self, bins: int = 8, tail_bound: float = 5.0, min_width: float = 1e-3,
                 min_height: float = 1e-3, min_derivative: float = 1e-3):
        if bins < 1 or tail_bound <= 0 or min_width * bins >= 1 or min_height * bins >= 1:
            raise ValueError(f"invalid spline: bins={bins}, tail_bound={tail_bound}, min_width={min_width}, "
                             f"min_height={min_height} (need bins >= 1, tail_bound > 0, min_* x bins < 1)")
        self.bins, self.tail_bound = bins, tail_bound
        self.min_width, self.min_height, self.min_derivative = min_width, min_height, min_derivative
        self.params = 3 * bins - 1
        # softplus(raw + shift) + min_derivative == 1 at raw == 0
        self._shift = math.log(math.expm1(1 - min_derivative))

    def __repr__(self) -> str:
        return f"SplineKernel(bins={self.bins}, tail_bound={self.tail_bound})"

    def _knots(self, raw: Tensor, minimum: float) -> tuple[Tensor, Tensor]:
        """Knot positions ``(*, K + 1)`` from ``-B`` to ``B`` and bin sizes ``(*, K)``."""
        k = self.bins
        sizes = minimum + (1 - minimum * k) * torch.softmax(raw, dim=-1)
        knots = torch.cumsum(sizes, dim=-1) * (2 * self.tail_bound) - self.tail_bound
        knots = F.pad(knots, (1, 0), value=-self.tail_bound)
        # the last knot is exactly B (cumsum rounding must not open a gap at the boundary)
        knots = torch.cat([knots[..., :-1], knots.new_full(knots[..., -1:].shape, self.tail_bound)], dim=-1)
        return knots, knots[..., 1:] - knots[..., :-1]

    def _spline(self, params: Tensor, dim: int):
        k = self.bins
        p = params.unflatten(dim, (self.params, -1)).movedim(dim - 1 if dim < 0 else dim, -1)
        xk, w = self._knots(p[..., :k], self.min_width)
        yk, h = self._knots(p[..., k: 2 * k], self.min_height)
        d = self.min_derivative + F.softplus(p[..., 2 * k:] + self._shift)
        ones = d.new_ones(d.shape[:-1] + (1,))
        d = torch.cat([ones, d, ones], dim=-1)  # unit slopes at +-B match the linear tails
        return xk, w, yk, h, d

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Applies the spline elementwise; the identity outside ``[-tail_bound, tail_bound]``.

        Args:
            x: the transformed part ``x_b``, e.g. ``(*batch, D_b)`` or ``(*batch, C_b, H, W)``.
            params: ``3 * bins - 1`` blocks of ``x``'s size along ``dim`` (raw widths, raw heights,
                raw interior derivatives), e.g. ``(*batch, (3 * bins - 1) * D_b)``.
            dim: the dimension along which the blocks are stacked (e.g. ``-1`` or ``-3``).

        Returns:
            ``(y, logd)``: ``y`` and the elementwise ``log|dy/dx|`` (0 outside the interval), both of
            ``x``'s shape.
        """
        xk, w, yk, h, d = self._spline(params, dim)
        inside = (x > -self.tail_bound) & (x < self.tail_bound)
        y, logd = _rq_forward(x.clamp(-self.tail_bound, self.tail_bound), xk, w, yk, h, d)
        return torch.where(inside, y, x), torch.where(inside, logd, torch.zeros_like(logd))

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Inverts the spline elementwise (a root of a quadratic per element); the identity outside.

        Args:
            y: the transformed part, of the shape of :meth:`forward`'s ``x``.
            params: ``3 * bins - 1`` blocks of ``y``'s size along ``dim`` (as in :meth:`forward`).
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(x, logd)``: ``x`` and the elementwise ``log|dx/dy|`` (0 outside the interval), both of
            ``y``'s shape.
        """
        xk, w, yk, h, d = self._spline(params, dim)
        inside = (y > -self.tail_bound) & (y < self.tail_bound)
        x, logd = _rq_inverse(y.clamp(-self.tail_bound, self.tail_bound), xk, w, yk, h, d)
        return torch.where(inside, x, y), torch.where(inside, logd, torch.zeros_like(logd))


def _wrap(u: Tensor) -> Tensor:
    """``u`` moved by a multiple of ``2 pi`` into ``[-pi, pi)``; exactly ``u`` where it already lies there."""
    return u - (2 * math.pi) * torch.floor((u + math.pi) / (2 * math.pi))


class CircularSplineKernel(SplineKernel):
    """Circular rational-quadratic spline: a diffeomorphism of the circle for angles in ``[-pi, pi)``.

    A monotone rational-quadratic spline with ``bins`` bins maps ``[-pi, pi]`` onto itself, fixing both
    ends; its derivatives at ``-pi`` and ``pi`` are one learned value, so the map and its derivative
    agree across the identification ``-pi ~ pi``; a learned rotation ``y = wrap(spline(x) + phi)`` then
    frees the fixed point. Parameters per element: ``3 * bins + 1`` (bin widths, bin heights, the
    derivatives at the ``bins`` knots ``-pi, ...`` with the last knot's equal to the first's, and
    ``phi``). At ``params = 0`` it is the identity. ``log|dy/dx|`` is the spline's (a rotation has unit
    derivative). The inverse is analytic: unrotate, then the root of a quadratic, as for
    :class:`SplineKernel`.

    Inputs are angles in ``[-pi, pi]`` (``pi`` and ``-pi`` are the same point); outputs lie in
    ``[-pi, pi)``. The conditioner reads the angles as they are: for a conditional density that is
    continuous across ``-pi ~ pi`` too, give it ``(cos, sin)`` of the conditioning angles (e.g. as
    the context), as Rezende et al. do.

    Args:
        bins: number of bins ``K``.
        min_width: floor on each bin's width, as a fraction of ``2 pi`` (``min_width * bins < 1``).
        min_height: floor on each bin's height, as a fraction of ``2 pi`` (``min_height * bins < 1``).
        min_derivative: floor on the derivatives at the knots.

    Raises:
        ValueError: If ``bins < 1``, ``min_width * bins >= 1`` or ``min_height * bins >= 1``; when
            called (with validation on), if an input lies outside ``[-pi, pi]``.

    References:
        Rezende, Papamakarios, Racaniere, Albergo, Kanwar, Shanahan & Cranmer, "Normalizing Flows on Tori and
        Spheres", 2020, section 3.1.
    """

    def __init__(self, bins: int = 8, min_width: float = 1e-3, min_height: float = 1e-3,
                 min_derivative: float = 1e-3):
        super().__init__(bins, math.pi, min_width, min_height, min_derivative)
        self.params = 3 * bins + 1

    def __repr__(self) -> str:
        return f"CircularSplineKernel(bins={self.bins})"

    def _circle(self, params: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        k = self.bins
        p = params.unflatten(dim, (self.params, -1)).movedim(dim - 1 if dim < 0 else dim, -1)
        xk, w = self._knots(p[..., :k], self.min_width)
        yk, h = self._knots(p[..., k: 2 * k], self.min_height)
        d = self.min_derivative + F.softplus(p[..., 2 * k: 3 * k] + self._shift)
        d = torch.cat([d, d[..., :1]], dim=-1)  # the same slope at -pi and pi
        return xk, w, yk, h, d, p[..., 3 * k]

    @staticmethod
    def _check(v: Tensor, who: str) -> None:
        if validation_enabled() and v.numel() and bool((v.abs() > math.pi * (1 + 1e-6)).any()):
            raise ValueError(f"CircularSplineKernel.{who} expects angles in [-pi, pi], got values in "
                             f"[{v.min().item():.6g}, {v.max().item():.6g}]")

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``y = wrap(spline(x) + phi)`` elementwise.

        Args:
            x: angles in ``[-pi, pi]``, e.g. ``(*batch, D_b)`` or ``(*batch, C_b, H, W)``.
            params: ``3 * bins + 1`` blocks of ``x``'s size along ``dim``.
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(y, logd)``: angles ``y`` in ``[-pi, pi)`` and the elementwise ``log|dy/dx|``, both of
            ``x``'s shape.

        Raises:
            ValueError: If an angle lies outside ``[-pi, pi]`` (with validation on).
        """
        self._check(x, "forward")
        xk, w, yk, h, d, phi = self._circle(params, dim)
        y, logd = _rq_forward(x.clamp(-math.pi, math.pi), xk, w, yk, h, d)
        return _wrap(y + phi), logd

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``x = spline^-1(wrap(y - phi))`` elementwise.

        Args:
            y: angles in ``[-pi, pi]``, of the shape of :meth:`forward`'s ``x``.
            params: ``3 * bins + 1`` blocks of ``y``'s size along ``dim`` (as in :meth:`forward`).
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(x, logd)``: angles ``x`` in ``[-pi, pi]`` and the elementwise ``log|dx/dy|``, both of
            ``y``'s shape.

        Raises:
            ValueError: If an angle lies outside ``[-pi, pi]`` (with validation on).
        """
        self._check(y, "inverse")
        xk, w, yk, h, d, phi = self._circle(params, dim)
        return _rq_inverse(_wrap(y - phi).clamp(-math.pi, math.pi), xk, w, yk, h, d)
