"""Invertible residual blocks: i-ResNets and Residual Flows.

A block maps ``z = x + g(x)`` where ``g`` is an MLP whose Lipschitz constant is below 1 (its weights are
spectrally normalised and its activations are 1-Lipschitz), so the block is a bijection of ``R^D``
(Behrmann et al. 2019). Its direction data -> latent is explicit; the other is numerical.

* **Forward** (data -> latent): ``z = x + g(x)``, explicit. Its log-determinant ``log det(I + J_g(x))`` is

  - **exact** in evaluation mode (``block.eval()``, which :func:`pushforward.train.evaluate` and every
    figure of the library use) and whenever ``estimator=None``: the Jacobian ``J_g`` is formed from the
    network's layers (a product of ``D``-column matrices, no autograd) and ``slogdet(I + J_g)`` taken, an
    ``O(B D H^2 + B D^3)`` computation for hidden width ``H``: cheap for the vectors this block is meant for;
  - **an unbiased random estimate** in training mode when ``estimator`` is a :class:`RussianRoulette`
    (the ``residual`` recipe's default): the power series ``sum_k (-1)^(k+1) tr(J^k) / k`` with
    Hutchinson's trace estimator and a randomly truncated (Russian roulette) number of terms (Chen et
    al. 2019). Each term costs one vector-Jacobian product (a pass through ``g``), again without autograd.
    Its gradient is unbiased too (the estimate is differentiated as it is computed).

* **Inverse** (latent -> data): **numerical**. Banach's fixed-point iteration ``x <- z - g(x)`` (it
  converges geometrically because ``Lip(g) < 1``) runs without gradients until successive iterates
  differ by at most ``tol`` (default ``sqrt(eps)`` of the dtype, relative to ``1 + |x|``); one Newton step
  with the exact Jacobian then brings the result to the dtype's precision and attaches the
  implicit-function gradient ``dx = (I + J_g)^{-1} (dz - dg)``. Its log-determinant is always exact.

The Lipschitz bound is **certified**: every weight matrix ``W`` is used as ``W * c / max(c, ||W||_2)``
with ``||W||_2`` its exact largest singular value (:func:`torch.linalg.matrix_norm`), recomputed from the
parameters at every call (torch's ``spectral_norm`` instead keeps power-iteration vectors as state,
which makes the map depend on the call history and on ``train()`` / ``eval()``). So ``g`` has Lipschitz
constant at most ``c^L`` for ``L`` weight matrices, the map is a function of the parameters alone, and
``forward`` is identical in both modes when ``estimator=None``. The exact norm costs ``O(H^3)`` per
hidden matrix per call.

References:
    Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, "Invertible Residual Networks", 2019.
    Chen, Behrmann, Duvenaud & Jacobsen, "Residual Flows for Invertible Generative Modeling", 2019.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Transform

__all__ = ["LipSwish", "ResidualBlock", "RussianRoulette"]

_SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(_SOFTPLUS_ONE) = 1


class LipSwish(nn.Module):
    """The 1-Lipschitz activation ``LipSwish(x) = x * sigmoid(beta x) / 1.1`` with a learned ``beta > 0``.

    ``beta = softplus(beta_raw)`` starts at 1. The derivative of ``x * sigmoid(beta x)`` never exceeds
    1.0998 whatever ``beta``, hence the division by 1.1. Shapes: ``(*, H) -> (*, H)``.

    References:
        Chen, Behrmann, Duvenaud & Jacobsen, "Residual Flows for Invertible Generative Modeling", 2019.
    """

    def __init__(self):
        super().__init__()
        self.beta_raw = nn.Parameter(torch.tensor(_SOFTPLUS_ONE))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(F.softplus(self.beta_raw) * x) / 1.1

    def with_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(LipSwish(x), d LipSwish(x) / dx)``, elementwise; the derivative lies in ``[-0.092, 1)``."""
        bx = F.softplus(self.beta_raw) * x
        s = torch.sigmoid(bx)
        y = x * s
        return y / 1.1, (s + bx * (s - s * s)) / 1.1


@dataclass(frozen=True)
class RussianRoulette:
    """The unbiased log-determinant estimator of Residual Flows, used by :class:`ResidualBlock` in training.

    ``log det(I + J) = sum_{k>=1} (-1)^(k+1) tr(J^k) / k`` (for ``||J|| < 1``). The first ``exact_terms``
    terms are always computed; then the number ``m`` of further terms is drawn from the geometric
    distribution ``P(m >= j) = (1 - p)^j`` and term ``exact_terms + j`` is divided by ``(1 - p)^j``, so the
    expectation over ``m`` is the whole series. Each trace is Hutchinson's ``v^T J^k v`` with
    ``v ~ N(0, I)`` averaged over ``samples`` probes. Random numbers come from torch's global generator.
    The expected number of terms is ``exact_terms + (1 - p) / p``. The variance grows with ``Lip(g)``:
    term ``k`` is of size up to ``Lip(g)^k / k``, and the ``j``-th term past the exact ones is reached with
    probability ``(1 - p)^j``, so its share of the variance stops shrinking once ``Lip(g)^2 > 1 - p``
    (``Lip(g) > 0.71`` for ``p = 0.5``); a smaller ``p`` or more ``exact_terms`` tame it.

    Args:
        p: stopping probability of the geometric distribution, in ``(0, 1)``.
        exact_terms: terms always computed (``>= 1``).
        samples: Hutchinson probe vectors per example (``>= 1``).

    Raises:
        ValueError: If an argument is out of its range.

    References:
        Chen, Behrmann, Duvenaud & Jacobsen, "Residual Flows for Invertible Generative Modeling", 2019.
        Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
    """

    p: float = 0.5
    exact_terms: int = 2
    samples: int = 1

    def __post_init__(self):
        if not 0 < self.p < 1:
            raise ValueError(f"RussianRoulette's p must lie in (0, 1), got {self.p}")
        if self.exact_terms < 1 or self.samples < 1:
            raise ValueError(f"RussianRoulette needs exact_terms >= 1 and samples >= 1, got "
                             f"{self.exact_terms} and {self.samples}")

    def terms(self) -> int:
        """Draws the number of terms of one estimate: ``exact_terms`` plus a geometric count."""
        extra = int(torch.empty((), dtype=torch.float64).geometric_(self.p)) - 1  # failures before success
        return self.exact_terms + extra

    def weight(self, k: int) -> float:
        """``1 / P(at least k terms)`` for term ``k`` (1-based)."""
        return (1 - self.p) ** -max(0, k - self.exact_terms)


class ResidualBlock(Transform):
    """An invertible residual block ``z = x + g(x)`` on vectors ``(*, D)`` with ``Lip(g) < 1``.

    ``g`` is the MLP ``D -> hidden... -> D`` with :class:`LipSwish` activations, each weight spectrally
    normalised to norm at most ``coefficient``; a context enters the first layer through its own weight
    (unconstrained: the bound is in ``x``). The last layer starts at zero, so the block starts as the
    identity. See the module docstring for the directions and the log-determinant.

    Args:
        features: ``D``.
        hidden: hidden widths of ``g``.
        coefficient: ``c`` in ``(0, 1)``, the bound on each weight's spectral norm.
        context_features: width of an optional context (0: none).
        estimator: the training-mode log-determinant, a :class:`RussianRoulette`; ``None``: exact in
            both modes (then ``forward`` is deterministic and equal in ``train()`` and ``eval()``).
        tol: fixed-point tolerance of the inverse (relative to ``1 + |x|``); ``None``: ``sqrt(eps)``.
        max_iter: most fixed-point iterations before the inverse raises.

    Raises:
        ValueError: If ``coefficient`` is not in ``(0, 1)`` or a width is not positive.

    References:
        Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, "Invertible Residual Networks", 2019.
        Chen, Behrmann, Duvenaud & Jacobsen, "Residual Flows for Invertible Generative Modeling", 2019.
    """

    def __init__(self, features: int, hidden: Sequence[int] = (128, 128), coefficient: float = 0.97,
                 context_features: int = 0, estimator: RussianRoulette | None = None,
                 tol: float | None = None, max_iter: int = 10_000):
        super().__init__()
        sizes = [features, *hidden, features]
        if min(sizes) < 1:
            raise ValueError(f"ResidualBlock needs positive widths, got features={features}, "
                             f"hidden={tuple(hidden)}")
        if not 0 < coefficient < 1:
            raise ValueError(f"ResidualBlock's coefficient must lie in (0, 1) (it bounds Lip(g)), "
                             f"got {coefficient}")
        self.features, self.coefficient = features, float(coefficient)
        self.context_features = context_features
        self.estimator, self.tol, self.max_iter = estimator, tol, max_iter
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        nn.init.zeros_(self._linears()[-1].weight)
        nn.init.zeros_(self._linears()[-1].bias)
        self.activations = nn.ModuleList(LipSwish() for _ in hidden)
        self.context = nn.Linear(context_features, sizes[1], bias=False) if context_features else None

    # -- g, its vector-Jacobian product and Jacobian ------------------------------------------------------
    def _linears(self) -> list[nn.Linear]:
        return [cast(nn.Linear, lin) for lin in self.linears]

    def weights(self) -> list[Tensor]:
        """The normalised weights ``W * c / max(c, ||W||_2)``, recomputed from the parameters."""
        out = []
        for lin in self._linears():
            w = lin.weight
            norm = torch.linalg.matrix_norm(w, ord=2)
            out.append(w * (self.coefficient / torch.clamp(norm, min=self.coefficient)))
        return out

    def g(self, x: Tensor, context: Tensor | None, weights: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``g(x)`` of shape ``(*, D)`` and the derivatives of the activations at each hidden layer."""
        slopes = []
        h = x
        for i, (lin, w) in enumerate(zip(self._linears(), weights, strict=True)):
            a = h @ w.mT + lin.bias
            if i == 0 and self.context is not None:
                if context is None:
                    raise ValueError(f"this ResidualBlock was built for a context of {self.context_features} "
                                     "features; got none")
                a = a + self.context(context)
            if i < len(self.activations):
                h, slope = cast(LipSwish, self.activations[i]).with_derivative(a)
                slopes.append(slope)
            else:
                h = a
        return h, slopes

    @staticmethod
    def vjp(v: Tensor, weights: list[Tensor], slopes: list[Tensor]) -> Tensor:
        """``v^T J_g`` for rows ``v`` of shape ``(*, D)`` (the Jacobian at the point ``slopes`` came from)."""
        for w, s in zip(weights[:0:-1], slopes[::-1], strict=True):
            v = (v @ w) * s
        return v @ weights[0]

    @staticmethod
    def jacobian(weights: list[Tensor], slopes: list[Tensor], batch: torch.Size) -> Tensor:
        """``J_g`` of shape ``(*batch, D, D)``: ``W_L diag(s_{L-1}) W_{L-1} ... diag(s_1) W_1``.

        Formed from the left, ``D`` rows at a time: each step is one product of ``(batch * D, H)`` rows.
        """
        m = weights[-1].expand(*batch, *weights[-1].shape)
        for w, s in zip(weights[-2::-1], slopes[::-1], strict=True):
            m = (m * s[..., None, :]) @ w
        return m

    def _exact(self, weights, slopes, batch) -> Tensor:
        j = self.jacobian(weights, slopes, batch)
        eye = torch.eye(self.features, dtype=j.dtype, device=j.device)
        return torch.linalg.slogdet(eye + j)[1]

    def _estimate(self, x: Tensor, weights, slopes, estimator: RussianRoulette) -> Tensor:
        n = estimator.terms()
        v = torch.randn(estimator.samples, *x.shape, dtype=x.dtype, device=x.device)
        slopes = [s.expand(estimator.samples, *s.shape) for s in slopes]
        w, total = v, x.new_zeros(())
        for k in range(1, n + 1):
            w = self.vjp(w, weights, slopes)
            total = total + ((-1) ** (k + 1) / k * estimator.weight(k)) * (w * v).sum(-1)
        return total.mean(0)

    # -- the two directions --------------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``z = x + g(x)`` (data -> latent), explicit.

        Args:
            x: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(z, ladj)``: ``z`` of shape ``(*batch, D)``; ``ladj = log det(I + J_g(x))`` of shape
            ``(*batch,)``, exact in evaluation mode or with ``estimator=None``, else the Russian-roulette
            estimate (unbiased, random).
        """
        weights = self.weights()
        gx, slopes = self.g(x, context, weights)
        if self.training and self.estimator is not None:
            ladj = self._estimate(x, weights, slopes, self.estimator)
        else:
            ladj = self._exact(weights, slopes, x.shape[:-1])
        return x + gx, ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x = f^{-1}(z)`` (latent -> data), numerical: fixed-point iteration, then one Newton step.

        Args:
            z: ``(*batch, D)``.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``(x, ladj)``: ``x`` of shape ``(*batch, D)`` with ``x + g(x) = z`` to the dtype's precision, and
            the exact ``ladj = -log det(I + J_g(x))`` of shape ``(*batch,)``.

        Raises:
            RuntimeError: If the iteration has not reached ``tol`` after ``max_iter`` steps, or met a NaN.
        """
        weights = self.weights()
        tol = math.sqrt(torch.finfo(z.dtype).eps) if self.tol is None else self.tol
        with torch.no_grad():
            zd = z.detach()
            cd = None if context is None else context.detach()
            wd = [w.detach() for w in weights]
            x = zd
            for _ in range(self.max_iter):
                new = zd - self.g(x, cd, wd)[0]
                step = float((new - x).abs().amax()) if new.numel() else 0.0
                x = new
                if step <= tol * (1 + float(x.abs().amax())):
                    break
                if not math.isfinite(step):
                    raise RuntimeError("ResidualBlock.inverse: the fixed-point iteration met a non-finite "
                                       "value (the input holds NaN or inf?)")
            else:
                raise RuntimeError(f"ResidualBlock.inverse: the fixed-point iteration did not reach "
                                   f"tol={tol:g} in {self.max_iter} steps (last step {step:.3g}); raise "
                                   "max_iter or tol")
        # one Newton step with the exact Jacobian: precision, and the implicit-function gradient
        gx, slopes = self.g(x, context, weights)
        eye = torch.eye(self.features, dtype=z.dtype, device=z.device)
        a = eye + self.jacobian(weights, slopes, x.shape[:-1])
        x = x - torch.linalg.solve(a, x + gx - z)
        _, slopes = self.g(x, context, weights)
        return x, -self._exact(weights, slopes, x.shape[:-1])

    def extra_repr(self) -> str:
        sizes = [lin.in_features for lin in self._linears()] + [self.features]
        return (f"sizes={sizes}, coefficient={self.coefficient}, context_features={self.context_features}, "
                f"estimator={self.estimator}")
