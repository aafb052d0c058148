"""Linear transforms ``z = W x + b`` (lecture: the linear family).

Costs of ``log|det W|``: full matrix O(D^3) (slogdet), triangular and LU O(D), permutation 0.
Inverses use triangular solves wherever the structure allows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Transform

__all__ = [
    "GaussianWhitening",
    "InvertibleConv1x1",
    "LULinear",
    "Linear",
    "LowerTriangular",
    "Permutation",
    "Reverse",
    "Triangular",
    "UpperTriangular",
]


def _batch(x: Tensor, event_dim: int) -> torch.Size:
    return x.shape[: x.dim() - event_dim]


class Linear(Transform):
    """Full-rank ``z = W x + b`` on ``(*, D)``; ``log|det W|`` by ``slogdet`` (O(D^3)).

    Initialised with a random orthogonal ``W`` (|det| = 1) and ``b = 0``. The inverse solves the
    linear system (O(D^3)); ``ladj`` has the batch shape ``(*,)``.

    Args:
        features: ``D``.

    References:
        Kobyzev, Prince & Brubaker, "Normalizing Flows: An Introduction and Review of Current Methods",
        2020, section 3.2.
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(features, features)))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = torch.linalg.slogdet(self.weight)[1]
        return F.linear(x, self.weight, self.bias), ladj.expand(_batch(x, 1))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = torch.linalg.slogdet(self.weight)[1]
        x = torch.linalg.solve(self.weight.T, z - self.bias, left=False)
        return x, -ladj.expand(_batch(z, 1))

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Triangular(Transform):
    """``z = L x + b`` with ``L`` triangular and a positive diagonal ``exp(log_diag)``.

    ``log|det L| = sum(log_diag)`` in O(D); the inverse is a triangular solve in O(D^2). Acts on
    ``(*, D)``; initialised at the identity.

    Args:
        features: ``D``.
        upper: upper instead of lower triangular.

    References:
        Kobyzev, Prince & Brubaker, "Normalizing Flows: An Introduction and Review of Current Methods",
        2020, section 3.2.
    """

    def __init__(self, features: int, upper: bool = False):
        super().__init__()
        self.features, self.upper = features, upper
        self.off_diagonal = nn.Parameter(torch.zeros(features, features))
        self.log_diag = nn.Parameter(torch.zeros(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def weight(self) -> Tensor:
        off = self.off_diagonal.triu(1) if self.upper else self.off_diagonal.tril(-1)
        return off + torch.diag(self.log_diag.exp())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return F.linear(x, self.weight(), self.bias), self.log_diag.sum().expand(_batch(x, 1))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w = self.weight()
        # x W^T = z - b, and W^T is upper triangular when W is lower.
        x = torch.linalg.solve_triangular(w.T, z - self.bias, upper=not self.upper, left=False)
        return x, -self.log_diag.sum().expand(_batch(z, 1))

    def extra_repr(self) -> str:
        return f"features={self.features}, upper={self.upper}"


def _ledoit_wolf(centred: Tensor, cov: Tensor, scale: float) -> float:
    """Ledoit & Wolf's (2004) weight ``a`` of the shrunk covariance ``(1 - a) cov + a scale I`` (``centred``:
    the ``(N, D)`` rows minus their mean; ``cov``: their population covariance; ``scale``: its mean
    variance). It estimates the weight that minimises the expected squared error of the estimate: near 0
    for many rows, larger for few rows and many columns."""
    n = centred.shape[0]
    target = scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    d2 = float(((cov - target) ** 2).sum())
    if d2 <= 0:
        return 0.0
    b2 = 0.0
    for chunk in centred.split(4096):  # sum_n ||x_n x_n^T - cov||^2 without an (N, D, D) tensor
        b2 += float(((chunk[:, :, None] * chunk[:, None, :] - cov) ** 2).sum())
    return min(1.0, b2 / n**2 / d2)


class GaussianWhitening(Triangular):
    """``z = L^-1 (x - mean)``: a lower-triangular layer that starts at the full-covariance Gaussian of data.

    Data-dependent (like :class:`~pushforward.transforms.ActNorm`): the first batch it sees in training
    mode, or the batch given to :func:`pushforward.initialize`, sets ``mean`` and the Cholesky factor
    ``L`` of the batch's (population) covariance ``L L^T``. A :class:`~pushforward.core.Flow` of this
    layer and a standard normal base is then exactly the maximum-likelihood Gaussian of the batch; as
    the first layer of a flow whose other layers start as the identity, the flow starts there.
    Afterwards it is a trainable :class:`Triangular` (positive diagonal). Until initialised it is
    the identity; an empty batch leaves it uninitialised; non-finite data is a ``ValueError``. A
    singular covariance (fewer rows than features, collinear columns) gets the smallest ridge
    ``jitter * trace / D * I`` (growing tenfold from ``jitter``) that makes it positive definite.

    Args:
        features: ``D``.
        jitter: the first relative ridge tried when the covariance is singular.
        shrinkage: ``0`` (the maximum-likelihood covariance), a weight ``a`` in ``[0, 1]``, or
            ``"ledoit-wolf"`` (``a`` estimated from the batch, Ledoit & Wolf 2004): the covariance is
            then ``(1 - a) S + a (trace S / D) I``, a better-conditioned estimate that generalises
            better from few rows (the ``table`` entry's default; near ``S`` itself for many rows).
    """

    initialized: Tensor

    def __init__(self, features: int, jitter: float = 1e-9, shrinkage: float | str = 0.0):
        super().__init__(features, upper=False)
        if not (shrinkage == "ledoit-wolf" or (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1)):
            raise ValueError(f"GaussianWhitening: shrinkage is a weight in [0, 1] or 'ledoit-wolf', got "
                             f"{shrinkage!r}")
        self.jitter = jitter
        self.shrinkage = shrinkage
        self.register_buffer("initialized", torch.tensor(False))

    def reset_initialization(self) -> None:
        """Marks the layer uninitialised: the next training-mode batch (or ``initialize``) sets it."""
        self.initialized.fill_(False)

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Sets the layer to the Gaussian of ``x`` ``(N, D)`` (in float64) and marks it initialised."""
        x64 = x.detach().reshape(-1, self.features).double()
        if x64.shape[0] == 0:
            return
        if not bool(torch.isfinite(x64).all()):
            raise ValueError("GaussianWhitening cannot be initialised from non-finite data")
        mean = x64.mean(0)
        centred = x64 - mean
        cov = centred.T @ centred / x64.shape[0]
        scale = float(cov.diagonal().mean()) or 1.0
        a = _ledoit_wolf(centred, cov, scale) if self.shrinkage == "ledoit-wolf" else float(self.shrinkage)
        if a > 0:
            cov = (1 - a) * cov + a * scale * torch.eye(self.features, dtype=cov.dtype, device=cov.device)
        eye = torch.eye(self.features, dtype=torch.float64, device=x.device)
        ridge = 0.0
        while True:
            factor, info = torch.linalg.cholesky_ex(cov + ridge * scale * eye)
            if int(info) == 0 and bool((factor.diagonal() > 0).all()):
                break
            ridge = self.jitter if ridge == 0 else 10 * ridge
            if ridge > 1.0:
                raise ValueError("GaussianWhitening: the covariance of the batch is not positive definite")
        w = torch.linalg.solve_triangular(factor, eye, upper=False)  # L^-1, lower triangular
        self.off_diagonal.copy_(w.tril(-1))
        self.log_diag.copy_(w.diagonal().log())
        self.bias.copy_(-(w @ mean))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized) and x.numel() > 0:
            self.fit(x)
        return super().forward(x, context)


class LowerTriangular(Triangular):
    """:class:`Triangular` with a lower-triangular matrix, on ``(*, D)``.

    Args:
        features: ``D``.
    """

    def __init__(self, features: int):
        super().__init__(features, upper=False)


class UpperTriangular(Triangular):
    """:class:`Triangular` with an upper-triangular matrix, on ``(*, D)``.

    Args:
        features: ``D``.
    """

    def __init__(self, features: int):
        super().__init__(features, upper=True)


class Permutation(Transform):
    """A fixed permutation of the first event dimension (features or channels); ``|det| = 1``.

    Args:
        permutation: a permutation of ``range(features)``, e.g. ``torch.randperm(D)``.
        event_dim: 1 for ``(*, D)`` vectors, 2 for ``(*, N, P)`` sequences (permutes tokens), 3 for
            ``(*, C, H, W)`` images (permutes channels).

    References:
        Kobyzev, Prince & Brubaker, "Normalizing Flows: An Introduction and Review of Current Methods",
        2020, section 3.2 (permutations between coupling layers: Dinh et al., "NICE", 2015).
    """

    permutation: Tensor
    inverse_permutation: Tensor

    def __init__(self, permutation: Tensor | list[int], event_dim: int = 1):
        super().__init__()
        perm = torch.as_tensor(permutation, dtype=torch.long)
        if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(len(perm))):
            raise ValueError(f"Permutation expects a permutation of range(n), got {perm.tolist()}")
        self.event_dim = event_dim
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def _apply_perm(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-self.event_dim] != index.numel():
            raise ValueError(
                f"{type(self).__name__} permutes {index.numel()} features on dim -{self.event_dim}, "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        return x.index_select(x.dim() - self.event_dim, index), x.new_zeros(_batch(x, self.event_dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._apply_perm(x, self.permutation)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._apply_perm(z, self.inverse_permutation)

    def extra_repr(self) -> str:
        return f"features={self.permutation.numel()}, event_dim={self.event_dim}"


class Reverse(Permutation):
    """Reverses the order of the features (tokens, channels) of ``(*, D)`` (``(*, N, P)``, ``(*, C, H, W)``).

    Between autoregressive layers it reverses their order: of the features (MAF), of the tokens
    (``event_dim=2``, TarFlow's patch-order reversal between blocks).

    Args:
        features: size of the first event dimension.
        event_dim: 1 for vectors, 2 for sequences, 3 for images.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017 (alternating the
        transformed half); Papamakarios et al., "Masked Autoregressive Flow", 2017 (reversed orders).
    """

    def __init__(self, features: int, event_dim: int = 1):
        super().__init__(torch.arange(features - 1, -1, -1), event_dim)


class LULinear(Transform):
    """``z = W x + b`` with ``W = P L (U + diag(sign * exp(log_abs_s)))``, ``P`` fixed.

    ``L`` is unit lower triangular, ``U`` strictly upper triangular; ``log|det W| = sum(log_abs_s)``
    in O(D). Initialised from the LU decomposition of a random orthogonal matrix (Glow).

    References:
        Kingma & Dhariwal, "Glow", 2018, section 3.2 (LU-decomposed parameterisation).
    """

    p: Tensor
    sign_s: Tensor
    _lower_mask: Tensor
    _eye: Tensor

    event_dim = 1

    def __init__(self, features: int, bias: bool = True):
        super().__init__()
        self.features = features
        w = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = upper.diagonal()
        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", s.sign().float())
        self.register_buffer("_lower_mask", torch.ones(features, features).tril(-1))
        self.register_buffer("_eye", torch.eye(features))
        self.lower = nn.Parameter(lower.tril(-1).float())
        self.upper = nn.Parameter(upper.triu(1).float())
        self.log_abs_s = nn.Parameter(s.abs().log().float())
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self._lower_mask + self._eye
        upper = self.upper * self._lower_mask.T + torch.diag(self.sign_s * self.log_abs_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """``W = P L U``."""
        lower, upper = self._factors()
        return self.p @ (lower @ upper)

    def inverse_weight(self) -> Tensor:
        """``W^-1 = U^-1 L^-1 P^T`` by two triangular solves."""
        lower, upper = self._factors()
        lower_inv_pt = torch.linalg.solve_triangular(lower, self.p.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, lower_inv_pt, upper=True)

    def _ladj(self, x: Tensor) -> Tensor:
        per_param = math.prod(x.shape[x.dim() - self.event_dim + 1:])
        return (self.log_abs_s.sum() * per_param).expand(_batch(x, self.event_dim))

    def _matmul(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self._matmul(x, self.weight())
        if self.bias is not None:
            z = z + self.bias
        return z, self._ladj(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.bias is not None:
            z = z - self.bias
        return self._matmul(z, self.inverse_weight()), -self._ladj(z)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class InvertibleConv1x1(LULinear):
    """Glow's invertible 1x1 convolution on ``(*, C, H, W)``, in LU form (no bias).

    ``log|det| = H * W * sum(log_abs_s)``.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    event_dim = 3

    def __init__(self, channels: int):
        super().__init__(channels, bias=False)

    def _matmul(self, x: Tensor, weight: Tensor) -> Tensor:
        # A batched matmul over the flattened pixels: about 2x faster than conv2d at a few channels.
        return torch.matmul(weight, x.flatten(-2)).unflatten(-1, x.shape[-2:])
