"""Pointwise transforms: the Jacobian is diagonal, so ``log|det| = sum_i log|g'(x_i)|``.

Every class here takes ``event_dim``, the number of trailing dimensions that form one event
(1 for vectors, 3 for images), over which the log-derivatives are summed.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Transform, sum_event, validation_enabled

__all__ = ["ActNorm", "ElementwiseAffine", "LeakyReLU", "Logit", "Sigmoid", "Tanh"]

_LOG2 = math.log(2.0)


class _Pointwise(Transform):
    """A parameter-free pointwise bijection given by ``_f`` and ``_finv``, each ``x -> (y, log|dy/dx|)``."""

    def __init__(self, event_dim: int = 1):
        super().__init__()
        self.event_dim = event_dim

    def _f(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _finv(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_domain(self, x: Tensor, low: float, high: float, closed: bool, what: str) -> None:
        if not validation_enabled():
            return
        bad = (x < low) | (x > high) if closed else (x <= low) | (x >= high)
        if bool(bad.any()):
            interval = f"[{low}, {high}]" if closed else f"({low}, {high})"
            found = x[bad]
            raise ValueError(
                f"{type(self).__name__}.{what} expects values in {interval}, got {found.numel()} outside "
                f"(min {x.min().item():.4g}, max {x.max().item():.4g})"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logd = self._f(x)
        return y, sum_event(logd, self.event_dim)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logd = self._finv(z)
        return x, sum_event(logd, self.event_dim)

    def extra_repr(self) -> str:
        return f"event_dim={self.event_dim}"


class LeakyReLU(_Pointwise):
    """``y = x`` for ``x >= 0`` and ``y = a x`` otherwise, with slope ``0 < a``.

    Pointwise on ``(*, *event)``; ``log|det| = log(a) * (number of negative entries)`` per event.

    Args:
        negative_slope: the slope ``a > 0`` for negative inputs.
        event_dim: trailing dimensions that form one event (1 for ``(*, D)``, 3 for ``(*, C, H, W)``).

    References:
        Kobyzev, Prince & Brubaker, "Normalizing Flows: An Introduction and Review of Current Methods",
        2020, section 3.1.
    """

    def __init__(self, negative_slope: float = 0.01, event_dim: int = 1):
        super().__init__(event_dim)
        if not negative_slope > 0:
            raise ValueError(f"LeakyReLU needs negative_slope > 0 to be invertible, got {negative_slope}")
        self.negative_slope = negative_slope

    def _f(self, x):
        neg = x < 0
        y = torch.where(neg, x * self.negative_slope, x)
        return y, neg.to(x.dtype) * math.log(self.negative_slope)

    def _finv(self, y):
        neg = y < 0
        x = torch.where(neg, y / self.negative_slope, y)
        return x, neg.to(y.dtype) * -math.log(self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, event_dim={self.event_dim}"


class Sigmoid(_Pointwise):
    """``y = sigmoid(x)``: maps the real line onto ``(0, 1)``. Its inverse is :class:`Logit`.

    Pointwise on ``(*, *event)``; ``log|dy/dx| = log sigmoid(x) + log sigmoid(-x)``, summed over the
    ``event_dim`` trailing dimensions. The inverse checks that its input lies in ``(0, 1)``.

    References:
        Kobyzev, Prince & Brubaker, "Normalizing Flows: An Introduction and Review of Current Methods",
        2020, section 3.1.
    """

    def _f(self, x):
        return torch.sigmoid(x), -F.softplus(-x) - F.softplus(x)

    def _finv(self, y):
        self._check_domain(y, 0.0, 1.0, closed=False, what="inverse")
        return torch.logit(y), -torch.log(y) - torch.log1p(-y)


class Logit(_Pointwise):
    """Preprocessing for data in ``[0, 1]``: ``y = logit(alpha + (1 - 2 alpha) x)``.

    ``alpha`` keeps the logit away from infinity at 0 and 1 (RealNVP uses 0.05). Its
    log-determinant is counted, so densities stay exact in the data space.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, section 4.1.
    """

    def __init__(self, alpha: float = 0.05, event_dim: int = 1):
        super().__init__(event_dim)
        if not 0 <= alpha < 0.5:
            raise ValueError(f"Logit needs 0 <= alpha < 0.5, got {alpha}")
        self.alpha = alpha
        self._log_scale = math.log1p(-2 * alpha)

    def _f(self, x):
        self._check_domain(x, 0.0, 1.0, closed=True, what="forward")
        s = self.alpha + (1 - 2 * self.alpha) * x
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        return log_s - log_1ms, self._log_scale - log_s - log_1ms

    def _finv(self, z):
        x = (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)
        return x, -F.softplus(-z) - F.softplus(z) - self._log_scale

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, event_dim={self.event_dim}"


class Tanh(_Pointwise):
    """``y = tanh(x)``: maps the real line onto ``(-1, 1)``.

    Pointwise on ``(*, *event)``; ``log|dy/dx| = log(1 - tanh(x)^2)`` (computed stably), summed over
    the ``event_dim`` trailing dimensions. The inverse checks that its input lies in ``(-1, 1)``.

    References:
        Kobyzev, Prince & Brubaker, "Normalizing Flows: An Introduction and Review of Current Methods",
        2020, section 3.1.
    """

    def _f(self, x):
        # log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x)), stable for large |x|.
        return torch.tanh(x), 2 * (_LOG2 - x - F.softplus(-2 * x))

    def _finv(self, y):
        self._check_domain(y, -1.0, 1.0, closed=False, what="inverse")
        return torch.atanh(y), -torch.log1p(-y.square())


def _param_shape(features: int, event_dim: int) -> tuple[int, ...]:
    """Per-feature parameters on the first event dimension, broadcast over the rest."""
    return (features,) + (1,) * (event_dim - 1)


class ElementwiseAffine(Transform):
    """``z = x * exp(log_scale) + shift`` with one scale (and shift) per feature.

    The parameters live on the first event dimension (features for vectors, channels for images)
    and are broadcast over the others. With ``shift=False`` this is NICE's diagonal scaling layer.
    Initialised at the identity.

    Args:
        features: size of the first event dimension.
        event_dim: 1 for ``(*, D)`` vectors, 3 for ``(*, C, H, W)`` images.
        shift: learn a shift as well as a scale.

    References:
        Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation", 2015 (scaling).
    """

    def __init__(self, features: int, event_dim: int = 1, shift: bool = True):
        super().__init__()
        self.features, self.event_dim = features, event_dim
        shape = _param_shape(features, event_dim)
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.shift = nn.Parameter(torch.zeros(shape)) if shift else None

    def _ladj(self, x: Tensor) -> Tensor:
        per_param = math.prod(x.shape[x.dim() - self.event_dim + 1:])
        return (self.log_scale.sum() * per_param).expand(x.shape[: x.dim() - self.event_dim])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = x * self.log_scale.exp()
        if self.shift is not None:
            z = z + self.shift
        return z, self._ladj(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.shift is not None:
            z = z - self.shift
        return z * torch.exp(-self.log_scale), -self._ladj(z)

    def extra_repr(self) -> str:
        return f"features={self.features}, event_dim={self.event_dim}, shift={self.shift is not None}"


class ActNorm(ElementwiseAffine):
    """Per-channel affine layer initialised from data (data -> latent direction).

    Until it is initialised it is the identity. The first non-empty batch its ``forward`` sees in
    training mode initialises it -- or :func:`pushforward.initialize` does, from a batch of your
    choice -- so that each feature of that batch has zero mean and unit variance. In eval mode an
    uninitialised layer stays the identity, so evaluating a model (validation before the first
    training step, :func:`pushforward.train.evaluate`) never initialises it from evaluation data.
    The initialised state is a buffer, so it survives ``state_dict`` round trips.

    A batch that cannot define the statistics never poisons the layer: an empty batch leaves it
    uninitialised (the next batch initialises it); a feature without measurable variance in the
    batch (a single sample, a constant channel: variance zero or lost in rounding) keeps scale 1 and
    is only centred, with a warning; non-finite statistics (NaN or infinite inputs) are a
    ``ValueError`` that leaves the layer unchanged.

    Args:
        features: size of the first event dimension (channels for images).
        event_dim: 1 for ``(*, D)`` vectors, 3 for ``(*, C, H, W)`` images.
        eps: added to the standard deviation.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    #: A feature whose variance is at most this many ulps of its mean square counts as constant.
    degenerate_ulps = 64
    shift: nn.Parameter  # always learned here
    initialized: Tensor

    def __init__(self, features: int, event_dim: int = 1, eps: float = 1e-6):
        super().__init__(features, event_dim, shift=True)
        self.eps = eps
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # Python mirror of the buffer: no data-dependent branch under compile.

    def initialize(self, x: Tensor) -> None:
        """Sets scale and shift so that ``x`` is normalised per feature (see the class docstring).

        Under ``torch.distributed`` the statistics are those of the batches of all processes together.

        Raises:
            ValueError: ``x`` is empty (on every process), or its statistics are not finite; the layer
                is then unchanged.
        """
        if not self._initialize(x):
            raise ValueError(f"ActNorm cannot be initialised from an empty batch (input shape "
                             f"{tuple(x.shape)})")

    @torch.no_grad()
    def reset_initialization(self) -> None:
        """Back to the uninitialised identity: the next non-empty batch initialises the layer again."""
        self.log_scale.zero_()
        self.shift.zero_()
        self.initialized.fill_(False)
        self._initialized = False

    def _initialize(self, x: Tensor) -> bool:
        """Initialises from ``x``; ``False`` (and nothing changed) if the batch is empty everywhere."""
        with torch.no_grad():
            dim = x.dim() - self.event_dim
            reduce = [d for d in range(x.dim()) if d != dim]
            count = x.numel() // self.features
            if count:
                mean = x.mean(dim=reduce)
                mean_sq = x.square().mean(dim=reduce)
            else:
                mean = mean_sq = x.new_zeros(self.features)
            reduced = self._reduce_statistics(mean, mean_sq, count)
            if reduced is None:
                return False
            mean, mean_sq = reduced
            bad = ~(torch.isfinite(mean) & torch.isfinite(mean_sq))
            if bool(bad.any()):
                raise ValueError(
                    f"ActNorm cannot be initialised from this batch: the statistics of {int(bad.sum())} of "
                    f"its {self.features} features are not finite (non-finite or overflowing inputs); the "
                    "layer is left unchanged"
                )
            var = (mean_sq - mean.square()).clamp_min(0)
            constant = var <= self.degenerate_ulps * torch.finfo(var.dtype).eps * mean_sq
            std = var.sqrt() + self.eps
            if bool(constant.any()):
                std = torch.where(constant, torch.ones_like(std), std)
                warnings.warn(
                    f"ActNorm: {int(constant.sum())} of {self.features} features have no measurable "
                    "variance in the initialisation batch (a single sample or a constant channel); they are "
                    "centred and keep scale 1",
                    stacklevel=2,
                )
            shape = self.log_scale.shape
            self.log_scale.copy_((-std.log()).reshape(shape))
            self.shift.copy_((-mean / std).reshape(shape))
            self.initialized.fill_(True)
            self._initialized = True
            return True

    def _reduce_statistics(self, mean: Tensor, mean_sq: Tensor, count: int) -> tuple[Tensor, Tensor] | None:
        """The statistics of all processes' batches together under ``torch.distributed`` (the same init on
        every rank; a rank with an empty batch contributes nothing); ``None`` if all batches are empty."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = torch.stack([mean * count, mean_sq * count, mean.new_full(mean.shape, count)])
            dist.all_reduce(stats)
            total = stats[2]
            if not bool(total[0] > 0):
                return None
            return stats[0] / total, stats[1] / total
        return (mean, mean_sq) if count else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self._initialized and self.training:
            self._initialize(x)  # an empty batch (everywhere) leaves the layer waiting for data
        return super().forward(x, context)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)
