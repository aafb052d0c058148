"""Neural autoregressive kernels: monotone neural networks as elementwise bijections.

Two kernels that plug into :class:`~pushforward.transforms.Autoregressive` (NAF, UNAF) or
:class:`~pushforward.transforms.Coupling` like the affine and spline kernels: the conditioner outputs,
for every transformed element, the parameters of a small strictly increasing network ``R -> R``.

* :class:`DeepSigmoidalKernel`: the deep sigmoidal flow (DSF) of NAF, ``y = logit(w . sigmoid(a x + b))``
  with ``a > 0`` and ``w`` on the simplex, and its dense multi-layer form (DDSF). The forward map and
  its log-derivative are closed forms, computed in log space.
* :class:`UMNNKernel`: an unconstrained monotonic neural network, ``y = beta + int_0^x g(t) dt`` with
  ``g > 0`` any network; the integral by Clenshaw-Curtis quadrature (approximate: see its docstring),
  the log-derivative ``log g(x)`` (exact).

Neither has an analytic inverse: :meth:`inverse` brackets the root and bisects it (batched, a fixed
number of steps computed from the tolerance, so it compiles), then takes one Newton step kept inside the
final bracket. Gradients of the inverse are those of the implicit function ``f(x) = y`` (one more
evaluation with autograd on), so the inverse trains (IAF direction) and its ``ladj`` is exact at the
point returned.

References:
    Huang, Krueger, Lacoste & Courville, "Neural Autoregressive Flows", 2018.
    Wehenkel & Louppe, "Unconstrained Monotonic Neural Networks", 2019.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import validation_enabled

__all__ = ["DeepSigmoidalKernel", "UMNNKernel", "clenshaw_curtis"]

Evaluate = Callable[[Tensor], tuple[Tensor, Tensor]]
_Layer = tuple[Tensor, Tensor, Tensor | None, Tensor]  # log a, b, log U (None: one input), log W
_Net = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # a, b, v, c, beta


def _elements(params: Tensor, blocks: int, dim: int) -> Tensor:
    """``params`` with ``blocks`` blocks along ``dim`` as ``(*x.shape, blocks)``: one row per element."""
    return params.unflatten(dim, (blocks, -1)).movedim(dim - 1 if dim < 0 else dim, -1)


def _solve(evaluate: Evaluate, y: Tensor, lo: Tensor, hi: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``x`` with ``f(x) = y`` for an increasing ``f`` given a bracket ``f(lo) < y <= f(hi)``.

    ``steps`` bisections without autograd, a Newton step clamped to the final bracket (so the error
    stays below the bracket's width ``(hi - lo) / 2**steps``), then the implicit-function gradients:
    ``x + (y - f(x)) / f'(x)`` with ``f'`` detached has value ``x`` (to rounding) and derivatives
    ``dx/dy = 1 / f'(x)``, ``dx/dp = -(df/dp) / f'(x)``. Returns ``(x, log dx/dy)``, the latter
    evaluated at that ``x`` with autograd, so its gradient is exact too.
    """
    with torch.no_grad():
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            below = evaluate(mid)[0] < y
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        x0 = 0.5 * (lo + hi)
        f0, logd0 = evaluate(x0)
        x1 = torch.minimum(torch.maximum(x0 - (f0 - y) * torch.exp(-logd0), lo), hi)
    f1, logd1 = evaluate(x1)
    x = x1 + (y - f1) * torch.exp(-logd1.detach())
    return x, -evaluate(x)[1]


class DeepSigmoidalKernel:
    """The deep sigmoidal flow (DSF) of neural autoregressive flows, and its dense form (DDSF).

    One sigmoidal layer maps ``h`` (of ``d_in`` units) to ``logit(W sigmoid(a * (U h) + b))`` (of
    ``d_out`` units) with ``a > 0`` (``min_slope + softplus``), ``b`` real and the rows of ``U`` and
    ``W`` on the simplex (softmax): every layer is strictly increasing in every input, and
    ``logit(mixture of sigmoids)`` maps the real line onto the real line. ``layers=1`` is DSF,
    ``y = logit(sum_j w_j sigmoid(a_j x + b_j))`` (``3 * units`` parameters per element);
    ``layers >= 2`` is DDSF with ``units`` hidden units between layers. The output and the
    log-derivative (a product of positive Jacobians, accumulated as a log-space vector from the input
    side) are exact closed forms, computed with ``logsigmoid`` / ``logsumexp`` so that no sigmoid
    saturates to 0 or 1.

    **Start.** Identical units would get identical gradients from a zero-initialised conditioner and
    stay identical, so the units must differ from the first step. By default
    (``identity_init=False``) they start with fixed distinct offsets (``b`` evenly over ``[-2, 2]``;
    DDSF's ``U`` and ``W``: each unit favours one unit of the layer before), so the kernel at
    ``params = 0`` is a fixed increasing bijection close to the identity (slope 0.5 to 1), **not the
    identity**: do not pair it with :class:`~pushforward.transforms.CheckerboardMask`, whose
    conditioning pixels rely on a kernel that is the identity at zero parameters (use
    ``identity_init=True`` there). With ``identity_init=True`` the kernel is exactly the identity at
    ``params = 0`` (``a = 1``, ``b = 0``, uniform ``U`` and ``W``: every unit is ``sigmoid(x)``, undone
    by the ``logit``), as the :class:`~pushforward.protocols.Kernel` protocol asks, and each raw
    parameter is scaled by its own fixed factor (evenly spaced in ``[0.25, 2]`` within a block), so
    the first step moves the units apart. It trains slower: on the checkerboard density, 12 CPU-s of
    the ``naf`` recipe reached a test NLL of 3.81-3.83 nats against 3.73 with the offsets (two seeds).

    **Inverse: numerical.** No closed form: the root is bracketed on the grid
    ``+-bound * 2**k`` (``k = 0..expansions``; one batched evaluation), bisected
    ``ceil(log2(2 * bound / tolerance))`` times and refined by one Newton step kept inside the bracket,
    so ``|x - x*| <= tolerance`` for ``|x*| <= bound`` and ``<= tolerance * |x*| / (2 * bound)``
    beyond (float64; float32 stops at its own resolution). A latent beyond ``f(+-bound * 2**expansions)``
    raises ``ValueError`` (when validation is on). Cost: about ``2 * expansions + 2 +
    log2(2 * bound / tolerance) + 3`` kernel evaluations (~65 with the defaults) per inverse.

    Args:
        units: sigmoid units per layer ``H``.
        layers: sigmoidal layers (1: DSF; 2 or more: DDSF).
        min_slope: floor on each ``a`` (so the tails have slope at least ``min_slope``).
        bound: half-width of the inverse's first bracket.
        expansions: how many doublings of the bracket the inverse searches.
        tolerance: the inverse's absolute tolerance for ``|x| <= bound`` (see above).
        identity_init: start as the exact identity at ``params = 0`` (see above).

    Raises:
        ValueError: If ``units < 1``, ``layers < 1``, ``min_slope <= 0``, ``bound <= 0``,
            ``expansions < 0`` or ``tolerance <= 0``.

    References:
        Huang, Krueger, Lacoste & Courville, "Neural Autoregressive Flows", 2018, section 3.1.
    """

    def __init__(self, units: int = 16, layers: int = 1, min_slope: float = 1e-3, bound: float = 4.0,
                 expansions: int = 12, tolerance: float = 1e-10, identity_init: bool = False):
        if (units < 1 or layers < 1 or not min_slope > 0 or not bound > 0 or expansions < 0
                or not tolerance > 0):
            raise ValueError(f"invalid DeepSigmoidalKernel: units={units}, layers={layers}, "
                             f"min_slope={min_slope}, bound={bound}, expansions={expansions}, "
                             f"tolerance={tolerance} (need units, layers >= 1, min_slope, bound, "
                             "tolerance > 0, expansions >= 0)")
        self.units, self.layers, self.min_slope = units, layers, min_slope
        self.bound, self.expansions, self.tolerance = bound, expansions, tolerance
        self.identity_init = identity_init
        dims = [1] + [units] * (layers - 1) + [1]
        self._shapes = list(itertools.pairwise(dims))  # (d_in, d_out) per layer
        self.params = sum(2 * units + (units * d_in if d_in > 1 else 0) + d_out * units
                          for d_in, d_out in self._shapes)
        self._shift = math.log(math.expm1(1 - min_slope))  # a == 1 at raw == 0
        self._steps = math.ceil(math.log2(2 * bound / tolerance))

    @property
    def identity_at_zero(self) -> bool:
        """Whether the kernel is the identity at ``params = 0`` (the :class:`~pushforward.protocols.Kernel`
        protocol's default); :class:`~pushforward.transforms.Coupling` refuses a mask that relies on it
        (:class:`~pushforward.transforms.CheckerboardMask`) when it is not."""
        return self.identity_init

    def __repr__(self) -> str:
        init = ", identity_init=True" if self.identity_init else ""
        return f"DeepSigmoidalKernel(units={self.units}, layers={self.layers}{init})"

    def _block(self, p: Tensor, i: int, shape: tuple[int, ...]) -> Tensor:
        """The raw parameters ``p[..., i: i + n]`` as ``(*, *shape)`` (``identity_init``: each scaled by
        its own fixed factor)."""
        n = math.prod(shape)
        raw = p[..., i: i + n]
        if self.identity_init:
            raw = raw * torch.linspace(0.25, 2.0, n, dtype=p.dtype, device=p.device)
        return raw.unflatten(-1, shape)

    def _layers(self, params: Tensor, dim: int) -> list[_Layer]:
        """Per layer ``(log a, b, log U or None, log W)``, each of shape ``(*x.shape, ...)``."""
        p = _elements(params, self.params, dim)
        h, out, i = self.units, [], 0
        offsets = not self.identity_init
        units = torch.arange(h, device=p.device)
        for d_in, d_out in self._shapes:
            log_a = torch.log(self.min_slope + F.softplus(self._block(p, i, (h,)) + self._shift))
            b = self._block(p, i + h, (h,))
            if offsets:  # spread evenly over [-2, 2]
                b = b + torch.linspace(-2.0, 2.0, h, dtype=p.dtype, device=p.device)
            i += 2 * h
            log_u = None
            if d_in > 1:
                raw_u = self._block(p, i, (h, d_in))
                if offsets:  # hidden unit k favours input unit k mod d_in
                    favour = torch.arange(d_in, device=p.device) == (units % d_in)[:, None]
                    raw_u = raw_u + 2 * favour.to(p.dtype)
                log_u = torch.log_softmax(raw_u, -1)
                i += h * d_in
            raw_w = self._block(p, i, (d_out, h))
            if offsets and d_out > 1:  # output unit j favours hidden unit j mod H
                raw_w = raw_w + 2 * (units == (torch.arange(d_out, device=p.device) % h)[:, None]).to(p.dtype)
            out.append((log_a, b, log_u, torch.log_softmax(raw_w, -1)))
            i += d_out * h
        return out

    @staticmethod
    def _evaluate(x: Tensor, layers: list[_Layer]) -> tuple[Tensor, Tensor]:
        """``(f(x), log f'(x))`` elementwise; the layer tensors broadcast against ``x[..., None]``."""
        h = x[..., None]
        logv = torch.zeros_like(h)  # log dh/dx, one entry per unit
        for log_a, b, log_u, log_w in layers:
            if log_u is None:
                pre, inner = h, logv
            else:
                pre = (log_u.exp() * h[..., None, :]).sum(-1)
                inner = torch.logsumexp(log_u + logv[..., None, :], -1)
            c = log_a.exp() * pre + b
            pos, neg = F.logsigmoid(c), F.logsigmoid(-c)
            log_d = torch.logsumexp(log_w + pos[..., None, :], -1)  # log of W sigmoid(c)
            log_1md = torch.logsumexp(log_w + neg[..., None, :], -1)  # log of 1 - W sigmoid(c)
            slope = pos + neg + log_a + inner
            logv = torch.logsumexp(log_w + slope[..., None, :], -1) - log_d - log_1md
            h = log_d - log_1md
        return h[..., 0], logv[..., 0]

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Applies the sigmoidal network elementwise.

        Args:
            x: the transformed part, e.g. ``(*batch, D)`` or ``(*batch, C, H, W)``.
            params: :attr:`params` blocks of ``x``'s size along ``dim``.
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(y, logd)``: ``y`` and the elementwise ``log dy/dx``, both of ``x``'s shape.
        """
        return self._evaluate(x, self._layers(params, dim))

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Inverts the network elementwise by bracketing and bisection (see the class docstring).

        Args:
            y: the transformed part, of the shape of :meth:`forward`'s ``x``.
            params: :attr:`params` blocks of ``y``'s size along ``dim`` (as in :meth:`forward`).
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(x, logd)``: ``x`` and the elementwise ``log dx/dy``, both of ``y``'s shape.

        Raises:
            ValueError: If a value of ``y`` lies beyond ``f(+-bound * 2**expansions)``.
        """
        layers = self._layers(params, dim)
        scales = self.bound * 2.0 ** torch.arange(self.expansions + 1, dtype=y.dtype, device=y.device)
        grid = torch.cat([-scales.flip(0), scales])
        with torch.no_grad():
            grid_layers = [tuple(t if t is None else t.unsqueeze(y.dim()) for t in layer) for layer in layers]
            f_grid = self._evaluate(grid.expand(*y.shape, -1), grid_layers)[0]  # type: ignore[arg-type]
            index = (f_grid < y[..., None]).sum(-1)
            if validation_enabled() and bool(((index == 0) | (index == len(grid))).any()):
                raise ValueError(f"DeepSigmoidalKernel.inverse: a value lies beyond f(+-{self.bound} * "
                                 f"2**{self.expansions}), the widest bracket searched; raise bound or "
                                 "expansions")
            index = index.clamp(1, len(grid) - 1)
            lo, hi = grid[index - 1], grid[index]
        return _solve(lambda v: self._evaluate(v, layers), y, lo, hi, self._steps)


@functools.cache
def _clenshaw_curtis(nodes: int) -> tuple[Tensor, Tensor]:
    n = nodes
    theta = torch.arange(n + 1, dtype=torch.float64) * math.pi / n
    weights = torch.ones(n + 1, dtype=torch.float64)
    for j in range(1, n // 2 + 1):
        b = 1.0 if 2 * j == n else 2.0
        weights = weights - b / (4 * j * j - 1) * torch.cos(2 * j * theta)
    weights = weights * torch.where((theta == 0) | (torch.arange(n + 1) == n), 1.0, 2.0) / n
    return (1 - torch.cos(theta)) / 2, weights / 2


def clenshaw_curtis(nodes: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Clenshaw-Curtis quadrature on ``[0, 1]``: ``int_0^1 f ~ sum_k weights[k] * f(points[k])``.

    ``points[k] = (1 - cos(k pi / nodes)) / 2`` for ``k = 0..nodes`` (increasing, both ends included);
    exact for polynomials of degree ``nodes``, and converging geometrically for analytic integrands.

    Args:
        nodes: an even number ``N >= 2``; ``N + 1`` points.
        dtype: dtype of the returned tensors (computed in float64).
        device: their device.

    Returns:
        ``(points, weights)``, both of shape ``(N + 1,)``.

    Raises:
        ValueError: If ``nodes`` is odd or below 2.

    References:
        Clenshaw & Curtis, "A method for numerical integration on an automatic computer", 1960.
    """
    if nodes < 2 or nodes % 2:
        raise ValueError(f"Clenshaw-Curtis quadrature needs an even number of nodes >= 2, got {nodes}")
    points, weights = _clenshaw_curtis(nodes)
    return points.to(dtype=dtype, device=device), weights.to(dtype=dtype, device=device)


class UMNNKernel:
    """An unconstrained monotonic neural network: ``y = beta + int_0^x g(t) dt`` with ``g > 0``.

    The integrand is a network of one hidden layer whose weights come from the conditioner, as NAF's
    pseudo-parameters do: ``g(t) = exp(L * tanh(s(t) / L))`` with
    ``s(t) = c + sum_j v_j tanh(a_j t + b_j)`` (``|a_j| < max_hidden_slope``, 1 at ``params = 0``;
    ``b_j`` offset evenly over ``[-3, 3]``), so ``log g`` lies in ``[-L, L]`` (``L = max_log_slope``)
    and ``s`` is unconstrained: only the network's output is made positive. Parameters per element:
    ``3 * units + 2`` (``a, b, v``, ``c``, ``beta``). At ``params = 0``, ``g = 1`` and ``beta = 0``: the
    identity. Beyond ``+-tail_bound`` the integrand is held at ``g(+-tail_bound)``, so the map
    continues as a straight line (exactly; like the linear tails of :class:`SplineKernel`).
    (Wehenkel & Louppe feed the conditioner's embedding to one shared integrand network; here the
    conditioner gives each element its own small integrand, which keeps the kernel a plain function
    of its parameters.)

    **Log-determinant:** ``log g(x)``, the exact log-derivative of the integral ``F``. **Forward
    value: approximate**, ``F`` by Clenshaw-Curtis quadrature with ``nodes + 1`` points on
    ``[0, x]``: the density returned, ``log p_z(y) + log g(x)``, is the integral map's at the
    quadrature's ``y``, exact up to the quadrature error in ``y``. That error falls geometrically
    with ``nodes`` for this analytic ``g`` but grows with the integrand's wiggles: against a
    512-node reference on ``[-5, 5]``, with raw parameters ``N(0, s^2)`` and the defaults, the
    largest error in ``y`` was ``8e-13`` (``s = 0.5``), ``9e-11`` (``s = 1``) and ``6e-8``
    (``s = 2``); with 32 nodes ``2e-7``, ``1e-5`` and ``1e-2`` (and no longer monotone).
    ``bench/neural.py`` reports it for trained flows.

    **Inverse: numerical.** Since ``e**-L <= g <= e**L``, the root lies between ``(y - beta) e**-L``
    and ``(y - beta) e**L``; that bracket is bisected ``ceil(log2(e**L (e**L - e**-L) / tolerance))``
    times and refined by one Newton step kept inside it, so ``|x - x*| <= tolerance * |x*|`` (float64)
    where ``x*`` is the root of the quadrature map: forward and inverse round-trip to that tolerance.
    Cost per inverse: about 50 quadratures with the defaults.

    Args:
        units: hidden units of the integrand network.
        nodes: quadrature nodes ``N`` (even); the forward evaluates ``g`` at ``N + 1`` points.
        tail_bound: ``B``: beyond ``+-B`` the map is linear.
        max_log_slope: the bound ``L`` on ``|log g|``.
        max_hidden_slope: the bound on the hidden slopes ``|a_j|`` (keeps ``g`` smooth enough for the
            quadrature).
        tolerance: the inverse's relative tolerance.

    Raises:
        ValueError: If ``units < 1``, ``nodes`` is odd or below 2, ``max_hidden_slope <= 1``, or
            ``tail_bound``, ``max_log_slope`` or ``tolerance`` is not positive.

    References:
        Wehenkel & Louppe, "Unconstrained Monotonic Neural Networks", 2019.
        Clenshaw & Curtis, "A method for numerical integration on an automatic computer", 1960.
    """

    def __init__(self, units: int = 16, nodes: int = 64, tail_bound: float = 5.0, max_log_slope: float = 5.0,
                 max_hidden_slope: float = 2.0, tolerance: float = 1e-10):
        if (units < 1 or nodes < 2 or nodes % 2 or not tail_bound > 0 or not max_log_slope > 0
                or not max_hidden_slope > 1 or not tolerance > 0):
            raise ValueError(f"invalid UMNNKernel: units={units}, nodes={nodes}, tail_bound={tail_bound}, "
                             f"max_log_slope={max_log_slope}, max_hidden_slope={max_hidden_slope}, "
                             f"tolerance={tolerance} (need units >= 1, an even nodes >= 2, "
                             "max_hidden_slope > 1, tail_bound, max_log_slope, tolerance > 0)")
        self.units, self.nodes, self.max_log_slope, self.tolerance = units, nodes, max_log_slope, tolerance
        self.tail_bound, self.max_hidden_slope = tail_bound, max_hidden_slope
        self._a_shift = math.atanh(1 / max_hidden_slope)
        self.params = 3 * units + 2
        big = math.exp(max_log_slope)
        self._steps = math.ceil(math.log2(big * (big - 1 / big) / tolerance))

    def __repr__(self) -> str:
        return f"UMNNKernel(units={self.units}, nodes={self.nodes}, max_log_slope={self.max_log_slope})"

    def _network(self, params: Tensor, dim: int) -> _Net:
        p = _elements(params, self.params, dim)
        h = self.units
        spread = torch.linspace(-3.0, 3.0, h, dtype=p.dtype, device=p.device)
        a = self.max_hidden_slope * torch.tanh(p[..., :h] + self._a_shift)  # 1 at raw 0, |a| < bound
        b, v = p[..., h: 2 * h] + spread, p[..., 2 * h: 3 * h]
        return a, b, v, p[..., 3 * h], p[..., 3 * h + 1]

    def _log_g(self, t: Tensor, a: Tensor, b: Tensor, v: Tensor, c: Tensor) -> Tensor:
        """``log g`` at ``t`` of shape ``(*x.shape, K)``; the parameters broadcast per element."""
        hidden = torch.tanh(a[..., None, :] * t[..., None] + b[..., None, :])
        s = c[..., None] + (v[..., None, :] * hidden).sum(-1)
        bound = self.max_log_slope
        return bound * torch.tanh(s / bound)

    def _evaluate(self, x: Tensor, net: _Net) -> tuple[Tensor, Tensor]:
        a, b, v, c, beta = net
        points, weights = clenshaw_curtis(self.nodes, x.dtype, x.device)
        xc = x.clamp(-self.tail_bound, self.tail_bound)
        log_g = self._log_g(xc[..., None] * points, a, b, v, c)  # the last point is xc itself
        slope = log_g[..., -1]
        # beyond +-B the integrand stays at g(+-B): the map continues as a straight line (exact)
        return beta + xc * (weights * log_g.exp()).sum(-1) + (x - xc) * slope.exp(), slope

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``y = beta + int_0^x g(t) dt`` elementwise (Clenshaw-Curtis quadrature).

        Args:
            x: the transformed part, e.g. ``(*batch, D)`` or ``(*batch, C, H, W)``.
            params: ``3 * units + 2`` blocks of ``x``'s size along ``dim``.
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(y, logd)``: ``y`` and the elementwise ``log dy/dx = log g(x)``, both of ``x``'s shape.
        """
        return self._evaluate(x, self._network(params, dim))

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Inverts the integral elementwise by bisection (see the class docstring).

        Args:
            y: the transformed part, of the shape of :meth:`forward`'s ``x``.
            params: ``3 * units + 2`` blocks of ``y``'s size along ``dim`` (as in :meth:`forward`).
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(x, logd)``: ``x`` and the elementwise ``log dx/dy = -log g(x)``, both of ``y``'s shape.
        """
        net = self._network(params, dim)
        with torch.no_grad():
            r = y - net[4]
            small, big = r * math.exp(-self.max_log_slope), r * math.exp(self.max_log_slope)
            lo, hi = torch.minimum(small, big), torch.maximum(small, big)
        return _solve(lambda v: self._evaluate(v, net), y, lo, hi, self._steps)
