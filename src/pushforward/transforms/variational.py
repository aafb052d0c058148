"""The flows of variational inference: planar, radial and Sylvester layers.

Each layer is written as in its paper, ``y = x + (a simple residual)``: that map is the layer's
**forward** here and it is explicit, with a closed-form log-determinant (``O(D)`` for planar and radial,
``O(D)`` for Sylvester given its triangular matrices). The papers use it in the sampling direction
(latent -> data), so the recipes :func:`~pushforward.models.planar`, :func:`~pushforward.models.radial`
and :func:`~pushforward.models.sylvester` wrap each layer in :class:`~pushforward.core.Inverse`: then
:meth:`~pushforward.core.Flow.sample_and_log_prob` (reverse-KL training) runs the explicit maps and
:meth:`~pushforward.core.Flow.log_prob` the inverses.

The papers give no inverse. Here, under the invertibility constraints (done exactly by the
reparametrisations below), the inverses are:

* :class:`Planar`: **numerical**, exact to the dtype's precision. ``w^T y + b = a + kappa tanh(a)`` with
  ``a = w^T x + b`` is a scalar monotone equation (``kappa = w^T u_hat > -1``), solved by bisection on
  the bracket ``[s - |kappa|, s + |kappa|]`` for a fixed number of halvings (the mantissa bits + 4), then
  Newton steps; then ``x = y - u_hat tanh(a)``.
* :class:`Radial`: **analytic**. The radius ``r = |x - x0|`` solves the quadratic
  ``r^2 + (alpha + beta - R) r - alpha R = 0`` with ``R = |y - x0|`` (its one non-negative root, in a
  cancellation-free form); then ``x = x0 + (y - x0) (alpha + r) / (alpha + r + beta)``.
* :class:`Sylvester`: **numerical**, exact to the dtype's precision. ``Q^T y = v + R h(R~ v + b)`` with
  ``v = Q^T x`` is upper triangular in ``v``: back-substitution from the last coordinate solves one scalar
  monotone equation per coordinate (bisection as for planar), ``D`` sequential steps.

Every numerical inverse ends with a Newton step taken *with* gradients, from the root found without them:
the result's derivatives are then those of the exact inverse (the implicit-function theorem), so sampling
through an inverse is reparameterisable and its log-determinant has the right gradient. Bisection with a
fixed number of steps has no data-dependent control flow, so both directions compile with
``torch.compile(fullgraph=True)``.

A context (amortised inference: the layer's parameters computed from the data point, as in the papers'
VAEs) is supported by every layer: the parameters are ``theta + net(context)`` with ``net`` a conditioner
built by the factory ``(context_features, parameters, 0)`` whose last layer starts at zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Transform
from ..nn import MLP
from ..protocols import ConditionerFactory

__all__ = ["Planar", "Radial", "Sylvester"]

_SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(_SOFTPLUS_ONE) = 1


def _bisect(fn: Callable[[Tensor], Tensor], target: Tensor, center: Tensor, halfwidth: Tensor) -> Tensor:
    """The root of the increasing ``fn(a) = target`` in ``[center - halfwidth, center + halfwidth]``.

    A fixed number of halvings (the dtype's mantissa bits + 4), elementwise, without gradients.
    """
    lo, hi = center - halfwidth, center + halfwidth
    for _ in range(round(-math.log2(torch.finfo(target.dtype).eps)) + 4):
        mid = 0.5 * (lo + hi)
        above = fn(mid) > target
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    return 0.5 * (lo + hi)


def _tanh_slope(a: Tensor) -> Tensor:
    return 1 - torch.tanh(a).square()


class _AmortisedLayer(Transform):
    """A layer whose parameter vector ``theta`` (``(P,)``) is shifted by ``net(context)`` when conditional."""

    def __init__(self, features: int, theta: Tensor, context_features: int, conditioner: ConditionerFactory):
        super().__init__()
        if features < 1:
            raise ValueError(f"{type(self).__name__} needs features >= 1, got {features}")
        self.features = features
        self.theta = nn.Parameter(theta)
        self.context_features = context_features
        self.net = conditioner(context_features, theta.numel(), 0) if context_features else None

    def conditioners(self) -> list[nn.Module]:
        return [] if self.net is None else [self.net]

    def parameters_at(self, context: Tensor | None) -> Tensor:
        """``theta`` of shape ``(P,)``, or ``theta + net(context)`` of shape ``(*batch, P)``."""
        if self.net is None:
            return self.theta
        if context is None:
            raise ValueError(f"this {type(self).__name__} was built for a context of {self.context_features} "
                             "features; got none")
        return self.theta + self.net(context)

    def extra_repr(self) -> str:
        return f"features={self.features}, context_features={self.context_features}"


_DEFAULT_NET = functools.partial(MLP, hidden=(64,))


class Planar(_AmortisedLayer):
    """The planar layer ``y = x + u_hat tanh(w^T x + b)`` on vectors ``(*, D)``.

    Invertible because ``w^T u_hat > -1``, enforced by the reparametrisation of Rezende & Mohamed
    (appendix A): ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` with ``m(s) = -1 + softplus(s + log(e - 1))``
    (the paper's ``m`` shifted so that ``m(0) = 0``: ``u = 0`` is the identity, where the layer starts;
    ``w`` starts random and must stay nonzero, as the paper's formula divides by ``|w|^2``).
    ``log|det| = log(1 + tanh'(w^T x + b) w^T u_hat)``, ``O(D)``.

    Forward: the explicit map above. Inverse: numerical (bisection on one scalar per example, then
    Newton; exact to the dtype's precision, see the module docstring). Use it inverted
    (:class:`~pushforward.core.Inverse`) to sample explicitly, as :func:`~pushforward.models.planar` does.

    Args:
        features: ``D``.
        context_features: width of an optional context (0: none).
        conditioner: factory of the network computing the parameters' shift from the context.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """

    def __init__(self, features: int, context_features: int = 0,
                 conditioner: ConditionerFactory = _DEFAULT_NET):
        u, b = torch.zeros(features), torch.zeros(1)
        theta = torch.cat([u, torch.randn(features) / math.sqrt(features), b])
        super().__init__(features, theta, context_features, conditioner)

    def _split(self, context):
        theta, d = self.parameters_at(context), self.features
        u, w, b = theta[..., :d], theta[..., d : 2 * d], theta[..., 2 * d]
        wu = (w * u).sum(-1, keepdim=True)
        kappa = F.softplus(wu + _SOFTPLUS_ONE) - 1  # m(w^T u) = w^T u_hat > -1
        u_hat = u + (kappa - wu) * w / w.square().sum(-1, keepdim=True)
        return u_hat, w, b, kappa[..., 0]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``y = x + u_hat tanh(w^T x + b)``, explicit.

        Args:
            x: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(y, ladj)`` of shapes ``(*batch, D)`` and ``(*batch,)``.
        """
        u_hat, w, b, kappa = self._split(context)
        a = (x * w).sum(-1) + b
        return x + u_hat * torch.tanh(a)[..., None], torch.log1p(kappa * _tanh_slope(a))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` with ``x + u_hat tanh(w^T x + b) = y``, numerical (bisection, then Newton).

        Args:
            y: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(x, ladj)`` of shapes ``(*batch, D)`` and ``(*batch,)``; ``ladj = -log(1 + tanh'(a) kappa)``.
        """
        u_hat, w, b, kappa = self._split(context)
        s = (y * w).sum(-1) + b  # = a + kappa tanh(a), increasing in a

        def fn(a, kappa=kappa):
            return a + kappa * torch.tanh(a)

        with torch.no_grad():
            kd = kappa.detach()
            a = _bisect(functools.partial(fn, kappa=kd), s.detach(), s.detach(), kd.abs().expand_as(s))
            a = a - (fn(a, kd) - s.detach()) / (1 + kd * _tanh_slope(a))
        a = a - (fn(a) - s) / (1 + kappa * _tanh_slope(a))  # with gradients: the implicit derivative
        return y - u_hat * torch.tanh(a)[..., None], -torch.log1p(kappa * _tanh_slope(a))


class Radial(_AmortisedLayer):
    """The radial layer ``y = x + beta (x - x0) / (alpha + |x - x0|)`` on vectors ``(*, D)``.

    Invertible because ``beta >= -alpha``, enforced by ``alpha = softplus(alpha_raw) > 0`` and
    ``beta = -alpha + softplus(beta_raw)``; the layer starts as the identity (``alpha = 1``, ``beta = 0``) at
    a random centre ``x0 ~ N(0, I)``. With ``r = |x - x0|`` and ``h = 1 / (alpha + r)``,
    ``log|det| = (D - 1) log(1 + beta h) + log(1 + beta alpha h^2)``, ``O(D)``.

    Forward: the explicit map. Inverse: analytic (a quadratic in the radius; see the module docstring).

    Args:
        features: ``D``.
        context_features: width of an optional context (0: none).
        conditioner: factory of the network computing the parameters' shift from the context.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """

    def __init__(self, features: int, context_features: int = 0,
                 conditioner: ConditionerFactory = _DEFAULT_NET):
        theta = torch.cat([torch.randn(features), torch.full((2,), _SOFTPLUS_ONE)])
        super().__init__(features, theta, context_features, conditioner)

    def _split(self, context):
        theta, d = self.parameters_at(context), self.features
        alpha = F.softplus(theta[..., d])
        return theta[..., :d], alpha, F.softplus(theta[..., d + 1]) - alpha

    def _ladj(self, r, alpha, beta):
        h = 1 / (alpha + r)
        return (self.features - 1) * torch.log1p(beta * h) + torch.log1p(beta * alpha * h.square())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``y = x + beta (x - x0) / (alpha + |x - x0|)``, explicit.

        Args:
            x: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(y, ladj)`` of shapes ``(*batch, D)`` and ``(*batch,)``.
        """
        x0, alpha, beta = self._split(context)
        d = x - x0
        r = torch.linalg.vector_norm(d, dim=-1)
        return x + (beta / (alpha + r))[..., None] * d, self._ladj(r, alpha, beta)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The analytic inverse: the radius from a quadratic, then a rescaling about ``x0``.

        Args:
            y: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(x, ladj)`` of shapes ``(*batch, D)`` and ``(*batch,)``.
        """
        x0, alpha, beta = self._split(context)
        dy = y - x0
        big_r = torch.linalg.vector_norm(dy, dim=-1)
        q = alpha + beta - big_r
        root = torch.sqrt(q.square() + 4 * alpha * big_r)
        r = torch.where(q < 0, 0.5 * (root - q), 2 * alpha * big_r / (q + root))  # both forms finite
        return x0 + dy * ((alpha + r) / (alpha + r + beta))[..., None], -self._ladj(r, alpha, beta)


class Sylvester(_AmortisedLayer):
    """The Sylvester layer ``y = x + Q R h(R~ Q^T x + b)`` on vectors ``(*, D)``, ``h = tanh``.

    ``R`` and ``R~`` are upper triangular ``D x D``, with diagonals ``tanh(.)`` so that
    ``R_ii R~_ii > -1 = -1 / sup|h'|``: the invertibility condition of van den Berg et al. (theorem 2).
    ``Q`` is orthogonal: the product of ``reflections`` Householder reflections (**Householder Sylvester
    flow**, H-SNF, exactly orthogonal) or, with ``reflections=0``, the identity (**triangular Sylvester
    flow**, T-SNF; the recipe reverses the coordinates between layers, the paper's alternating
    permutation). The paper's orthogonal variant with ``M < D`` columns (O-SNF) is not provided: its
    Bjorck orthogonalisation is iterative and only approximately orthogonal, so its log-determinant would
    not be exact. ``log|det| = sum_i log(1 + h'(a_i) R_ii R~_ii)`` with ``a = R~ Q^T x + b``, ``O(D)`` given
    ``a``. The layer starts as the identity (``R = 0``).

    Forward: the explicit map. Inverse: numerical (back-substitution, one bisection per coordinate, then a
    Newton step with a triangular solve; exact to the dtype's precision, see the module docstring).

    Args:
        features: ``D``.
        reflections: Householder reflections in ``Q`` (0: ``Q = I``, the triangular flow).
        context_features: width of an optional context (0: none).
        conditioner: factory of the network computing the parameters' shift from the context.

    Raises:
        ValueError: If ``reflections < 0``.

    References:
        van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational
        Inference", 2018.
    """

    def __init__(self, features: int, reflections: int = 0, context_features: int = 0,
                 conditioner: ConditionerFactory = _DEFAULT_NET):
        if reflections < 0:
            raise ValueError(f"Sylvester's reflections must be >= 0, got {reflections}")
        d, off = features, features * (features - 1) // 2
        theta = torch.cat([
            torch.zeros(d + off),  # R: diagonal (raw) and strict upper part: R = 0, the identity
            torch.randn(d), 0.1 * torch.randn(off),  # R~: diagonal (raw) and strict upper part
            torch.zeros(d),  # b
            torch.randn(reflections * d),  # Householder vectors
        ])
        super().__init__(features, theta, context_features, conditioner)
        self.reflections = reflections

    def _split(self, context):
        theta, d = self.parameters_at(context), self.features
        off = d * (d - 1) // 2
        rows, cols = torch.triu_indices(d, d, 1, device=theta.device).unbind(0)

        def upper(diag_raw, strict):
            m = strict.new_zeros(*strict.shape[:-1], d, d)
            m[..., rows, cols] = strict
            return m + torch.diag_embed(torch.tanh(diag_raw))

        i = 0
        parts = []
        for n in (d, off, d, off, d, self.reflections * d):
            parts.append(theta[..., i : i + n])
            i += n
        r, rt = upper(parts[0], parts[1]), upper(parts[2], parts[3])
        diag = torch.tanh(parts[0]) * torch.tanh(parts[2])  # R_ii R~_ii, in (-1, 1)
        return r, rt, parts[4], parts[5].unflatten(-1, (self.reflections, d)), diag

    @staticmethod
    def _reflect(x: Tensor, vs: Tensor, order) -> Tensor:
        for k in order:
            v = vs[..., k, :]
            x = x - (2 * (x * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True)) * v
        return x

    def _q(self, x, vs):  # Q x = H_1 ... H_K x
        return self._reflect(x, vs, reversed(range(self.reflections)))

    def _qt(self, x, vs):  # Q^T x = H_K ... H_1 x
        return self._reflect(x, vs, range(self.reflections))

    @staticmethod
    def _matvec(m: Tensor, v: Tensor) -> Tensor:
        return (m @ v[..., None])[..., 0]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``y = x + Q R tanh(R~ Q^T x + b)``, explicit.

        Args:
            x: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(y, ladj)`` of shapes ``(*batch, D)`` and ``(*batch,)``.
        """
        r, rt, b, vs, diag = self._split(context)
        a = self._matvec(rt, self._qt(x, vs)) + b
        y = x + self._q(self._matvec(r, torch.tanh(a)), vs)
        return y, torch.log1p(_tanh_slope(a) * diag).sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` with ``x + Q R tanh(R~ Q^T x + b) = y``, numerical (back-substitution, then Newton).

        Args:
            y: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(x, ladj)`` of shapes ``(*batch, D)`` and ``(*batch,)``.
        """
        r, rt, b, vs, diag = self._split(context)
        t = self._qt(y, vs)  # = v + R tanh(R~ v + b), v = Q^T x
        d = self.features
        with torch.no_grad():
            rd, rtd, bd, td = r.detach(), rt.detach(), b.detach(), t.detach()
            shape = torch.broadcast_shapes(td.shape, rd.shape[:-1], bd.shape)
            v, hv = td.new_zeros(shape), td.new_zeros(shape)  # solved coordinates, tanh(a) there
            for i in reversed(range(d)):  # v_j, j > i, are known; the others are still 0
                c = (rtd[..., i, :] * v).sum(-1) + bd[..., i]
                target = td[..., i] - (rd[..., i, :] * hv).sum(-1)
                r_ii, rt_ii = rd[..., i, i], rtd[..., i, i]

                def fn(s, r_ii=r_ii, rt_ii=rt_ii, c=c):
                    return s + r_ii * torch.tanh(rt_ii * s + c)

                s = _bisect(fn, target, target, r_ii.abs().expand_as(target))
                s = s - (fn(s) - target) / (1 + r_ii * rt_ii * _tanh_slope(rt_ii * s + c))
                v[..., i] = s
                hv[..., i] = torch.tanh(rt_ii * s + c)
        # one Newton step with gradients: J = I + R diag(h'(a)) R~, upper triangular
        a = self._matvec(rt, v) + b
        jac = torch.eye(d, dtype=v.dtype, device=v.device) + (r * _tanh_slope(a)[..., None, :]) @ rt
        residual = v + self._matvec(r, torch.tanh(a)) - t
        v = v - torch.linalg.solve_triangular(jac, residual[..., None], upper=True)[..., 0]
        a = self._matvec(rt, v) + b
        return self._q(v, vs), -torch.log1p(_tanh_slope(a) * diag).sum(-1)

    def extra_repr(self) -> str:
        kind = "triangular" if self.reflections == 0 else f"Householder, {self.reflections} reflections"
        return f"{super().extra_repr()}, {kind}"
