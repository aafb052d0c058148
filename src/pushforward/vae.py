"""The variational autoencoder: the baseline the lecture compares normalizing flows against.

A VAE is a latent-variable model ``p(x) = int p(x | z) p(z) dz`` with ``p(z) = N(0, I)``, a
decoder ``p(x | z)`` and an encoder ``q(z | x) = N(mu(x), diag sigma(x)^2)``. Its ``log p(x)`` is
intractable; training maximises the evidence lower bound (lecture: "training a VAE")

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))  <=  log p(x),

reported as its two terms, the reconstruction ``E_q[log p(x | z)]`` (one reparameterised sample)
and the KL divergence (in closed form). The importance-weighted bound (Burda et al., 2016)

    IWAE_k(x) = E[ log (1/k) sum_i p(x, z_i) / q(z_i | x) ],  z_i ~ q(z | x),

equals the ELBO in expectation for ``k = 1``, does not decrease with ``k``, and tends to
``log p(x)`` as ``k -> infinity``: with ``k = 1000`` it is the usual estimate of a VAE's
log-likelihood, to hold against a flow's exact one.

Same units as the flows. The decoder is a proper density on the data the flows see:

* vectors (2-D densities, tables): a Gaussian ``p(x | z) = N(m(z), diag s(z)^2)``;
* images (dequantized pixels ``y = (x + u) / K`` in ``[0, 1]``): a Gaussian in the flows' logit
  space ``t = logit(alpha + (1 - 2 alpha) y)`` (the same :class:`~pushforward.transforms.Logit`
  as the flow recipes, ``alpha = 0.05``) with the logit's log-determinant counted, so
  ``log p(y | z) = log N(t; m(z), s(z)^2) + log|dt/dy|``: a density of ``y``, in nats of the
  same dequantized ``y``, and bits/dim through :func:`pushforward.metrics.bits_per_dim` is an
  upper bound on the code length of the discrete images like the flows'. (Its mass outside
  ``[0, 1]`` is lost, exactly as for a flow with the logit preprocessing, so the bound stays valid.)

The encoder and decoder are built from the flows' conditioner blocks (:mod:`pushforward.nn`):
:class:`~pushforward.nn.MLP` for vectors; for images a stack of :class:`~pushforward.nn.ResNet`
levels, each followed by a 2x space-to-depth (the flows' squeeze), then a linear map to the latent
statistics, mirrored by the decoder (linear map, then depth-to-space and a ResNet per level).

:func:`vae` is registered as a recipe, so ``pushforward train --data digits --recipe vae`` trains
one with the same loop (``log_prob`` is the ELBO, or IWAE with ``k > 1``), checkpoints rebuild it
and :func:`pushforward.load` opens it.

References:
    Kingma & Welling, "Auto-Encoding Variational Bayes", 2014.
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import validation_enabled
from .nn import MLP, ResNet
from .recipes import recipe
from .transforms import Logit

__all__ = ["VAE", "default_latent", "default_levels", "vae"]

_LOG_2PI = math.log(2 * math.pi)
LIKELIHOODS = ("gaussian", "logit_gaussian")
ARCHS = ("mlp", "conv")


def _soft_clamp(x: Tensor, low: float, high: float) -> Tensor:
    """A smooth clamp of ``x`` to ``(low, high)``: about the identity inside, saturating at the ends."""
    return low + F.softplus(x - low) - F.softplus(x - high)


def _std_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z.square() + _LOG_2PI).sum(-1)


def default_latent(dims: int) -> int:
    """The latent size used when ``latent = 0``.

    ``D`` for ``D <= 4``, else ``D / 4`` within ``[8, 32]`` (and ``<= D``).
    """
    if dims <= 4:
        return dims
    return min(dims, 32, max(8, dims // 4))


def default_levels(height: int, width: int) -> int:
    """The number of 2x downsamplings used when ``levels = -1``: at most 2, keeping sides even and >= 4."""
    levels = 0
    while levels < 2 and height % 2 == 0 and width % 2 == 0 and height // 2 >= 4 and width // 2 >= 4:
        height, width, levels = height // 2, width // 2, levels + 1
    return levels


def _hidden_layer(net: ResNet) -> ResNet:
    """Gives a ResNet (built as a zero-initialised conditioner) a default-initialised head.

    For use inside a stack.
    """
    net.head.reset_parameters()
    return net


class _ConvEncoder(nn.Module):
    """``(C, H, W) -> out_features``: per level a ResNet then a 2x space-to-depth, then a linear map."""

    def __init__(self, shape, out_features, hidden_channels, blocks, levels, bottleneck, context_features):
        super().__init__()
        c, h, w = shape
        self.levels = levels
        self.nets = nn.ModuleList()
        cin = c
        for level in range(max(levels, 1)):
            cout = bottleneck if level == max(levels, 1) - 1 else hidden_channels
            net = ResNet(cin, cout, context_features, hidden_channels=hidden_channels, blocks=blocks)
            self.nets.append(_hidden_layer(net))
            cin = 4 * cout if level < levels else cout
        self.flat = cin * (h >> levels) * (w >> levels)
        self.out = MLP(self.flat, out_features, context_features, hidden=())

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        for level, net in enumerate(self.nets):
            x = F.relu(net(x, context))
            if level < self.levels:
                x = F.pixel_unshuffle(x, 2)
        return self.out(x.flatten(1), context)


class _ConvDecoder(nn.Module):
    """``latent -> (2 C, H, W)``: a linear map, then per level a 2x depth-to-space and a ResNet."""

    def __init__(self, shape, latent, hidden_channels, blocks, levels, bottleneck, context_features):
        super().__init__()
        c, h, w = shape
        self.levels = levels
        self.start = (4 * bottleneck if levels else bottleneck, h >> levels, w >> levels)
        self.inp = MLP(latent, math.prod(self.start), context_features, hidden=(), zero_init=False)
        self.nets = nn.ModuleList()
        cin = bottleneck
        for level in reversed(range(max(levels, 1))):
            last = level == 0
            cout = 2 * c if last else 4 * hidden_channels
            net = ResNet(cin, cout, context_features, hidden_channels=hidden_channels, blocks=blocks)
            self.nets.append(net if last else _hidden_layer(net))  # the output layer starts at zero
            cin = hidden_channels

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        x = F.relu(self.inp(z, context)).reshape(-1, *self.start)
        for i, net in enumerate(self.nets):
            if self.levels:
                x = F.pixel_shuffle(x, 2)
            x = net(x, context)
            if i < len(self.nets) - 1:
                x = F.relu(x)
        return x


class VAE(nn.Module):
    """A VAE with a diagonal Gaussian encoder, a standard normal prior and a Gaussian decoder.

    Build it with the :func:`vae` recipe (which records ``recipe`` so checkpoints rebuild it). It
    follows the :class:`~pushforward.core.Flow` interface where that makes sense: ``log_prob(x,
    context)`` (the training objective: the ELBO, or ``IWAE_k`` when ``k > 1``), ``sample``,
    ``event_shape`` and ``recipe``. :func:`pushforward.train.fit` trains it with the
    :class:`~pushforward.objectives.ELBO` objective (``IWAE_k`` for ``k > 1``).

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``.
        encoder: maps ``(B, *event_shape)`` (after :meth:`encoder_input`) and an optional
            context to ``(B, 2 * latent)``: the mean and raw log-scale of ``q(z | x)``.
        decoder: maps ``(N, latent)`` and an optional context to ``N`` x ``2 * prod(event_shape)``
            values: the location and raw log-scale of ``p(x | z)`` (laid out ``(N, 2 * D)`` or
            ``(N, 2 * C, H, W)``).
        latent: latent size.
        likelihood: ``"gaussian"`` (a Gaussian on ``x``) or ``"logit_gaussian"`` (a Gaussian on
            ``logit(alpha + (1 - 2 alpha) x)`` for data in ``[0, 1]``, with the log-determinant).
        alpha: the logit's squeeze, as in the flow recipes.
        k: importance samples of :meth:`log_prob`: ``1`` the ELBO (closed-form KL), ``> 1`` IWAE.
        scale_range: soft bounds of the decoder's log-scale (keeps the likelihood finite).

    References:
        Kingma & Welling, "Auto-Encoding Variational Bayes", 2014;
        Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", 2016.
    """

    _anchor: Tensor

    def __init__(self, event_shape: Sequence[int], encoder: nn.Module, decoder: nn.Module, latent: int,
                 likelihood: str = "gaussian", alpha: float = 0.05, k: int = 1,
                 scale_range: tuple[float, float] = (-7.0, 3.0)):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if k < 1:
            raise ValueError(f"k (importance samples of log_prob) must be >= 1, got {k}")
        self.event_shape = torch.Size(event_shape)
        self.encoder, self.decoder = encoder, decoder
        self.latent, self.likelihood, self.k = latent, likelihood, k
        self.scale_range = tuple(scale_range)
        logit = likelihood == "logit_gaussian"
        self.preprocess = Logit(alpha, event_dim=len(self.event_shape)) if logit else None
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        #: Recipe name and arguments, set by the :func:`vae` recipe so the model can be rebuilt.
        self.recipe: dict | None = None

    # -- helpers -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype."""
        return self._anchor.dtype

    @property
    def dims(self) -> int:
        return math.prod(self.event_shape)

    def _check(self, x: Tensor, context: Tensor | None, what: str) -> None:
        shape = tuple(self.event_shape)
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} expects a torch.Tensor of event shape {shape}, got {type(x).__name__}")
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{what} expects a tensor of shape (batch, {', '.join(map(str, shape))}), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"{what} expects a {self.dtype} tensor (the model's dtype), got {x.dtype}"
                            + ("; dequantize integer data first (pushforward.data.dequantize)"
                               if not x.is_floating_point() else ""))
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what} got {int((~torch.isfinite(x)).sum())} non-finite value(s) in its input")
        if context is not None and context.shape[0] != x.shape[0]:
            raise ValueError(f"context has batch size {context.shape[0]}, the data {x.shape[0]}")

    def encoder_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(t, ladj)``: the data in the space the decoder models and ``log|dt/dx|`` per example."""
        if self.preprocess is None:
            return x, x.new_zeros(x.shape[0])
        return self.preprocess(x)

    def encode(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The mean and log standard deviation of ``q(z | x)``, each ``(B, latent)``."""
        t, _ = self.encoder_input(x)
        return self._encode_t(t, context)

    def _encode_t(self, t: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        out = self.encoder(t, context)
        mu, raw = out[..., : self.latent], out[..., self.latent :]
        return mu, _soft_clamp(raw, -9.0, 4.0)

    def decode(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Location and log-scale of ``p(x | z)`` (in the decoder's space), each ``(N, *event_shape)``."""
        out = self.decoder(z, context).reshape(z.shape[0], 2, *self.event_shape)
        return out[:, 0], _soft_clamp(out[:, 1], *self.scale_range)

    def _log_px_z(self, t: Tensor, ladj: Tensor, z: Tensor, context: Tensor | None) -> Tensor:
        """``log p(x | z)`` for ``z`` of shape ``(S, B, latent)``; returns ``(S, B)``."""
        s, b = z.shape[:2]
        c = None if context is None else context.unsqueeze(0).expand(s, *context.shape).reshape(s * b, -1)
        loc, log_scale = self.decode(z.reshape(s * b, self.latent), c)
        loc, log_scale = loc.reshape(s, b, -1), log_scale.reshape(s, b, -1)
        e = (t.reshape(1, b, -1) - loc) * torch.exp(-log_scale)
        return -0.5 * (e.square() + _LOG_2PI).sum(-1) - log_scale.sum(-1) + ladj

    # -- the bounds ----------------------------------------------------------------------------
    def elbo(self, x: Tensor, context: Tensor | None = None,
             samples: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """``(elbo, reconstruction, kl)``, each of shape ``(B,)``, in nats of ``x``.

        ``reconstruction = E_q[log p(x | z)]`` estimated with ``samples`` reparameterised draws
        (differentiable), ``kl = KL(q(z | x) || N(0, I))`` in closed form, ``elbo = reconstruction - kl``.
        """
        if validation_enabled():
            self._check(x, context, "elbo")
        t, ladj = self.encoder_input(x)
        mu, log_sigma = self._encode_t(t, context)
        eps = torch.randn(samples, *mu.shape, dtype=mu.dtype, device=mu.device)
        z = mu + log_sigma.exp() * eps
        recon = self._log_px_z(t, ladj, z, context).mean(0)
        kl = 0.5 * (mu.square() + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(-1)
        return recon - kl, recon, kl

    def iwae(self, x: Tensor, k: int, context: Tensor | None = None, chunk: int | None = None) -> Tensor:
        """The importance-weighted bound ``log (1/k) sum_i p(x, z_i) / q(z_i | x)``, shape ``(B,)``.

        The ``k`` samples are drawn ``chunk`` at a time (default: :meth:`default_chunk`) and
        combined with a running ``logsumexp``, so memory stays bounded for any ``k``. Differentiable.
        """
        if k < 1:
            raise ValueError(f"iwae needs k >= 1, got {k}")
        if validation_enabled():
            self._check(x, context, "iwae")
        chunk = max(1, min(k, chunk or self.default_chunk(x.shape[0])))
        t, ladj = self.encoder_input(x)
        mu, log_sigma = self._encode_t(t, context)
        sigma = log_sigma.exp()
        parts = []
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            eps = torch.randn(m, *mu.shape, dtype=mu.dtype, device=mu.device)
            z = mu + sigma * eps
            log_q = _std_normal_log_prob(eps) - log_sigma.sum(-1)
            log_w = self._log_px_z(t, ladj, z, context) + _std_normal_log_prob(z) - log_q
            parts.append(torch.logsumexp(log_w, 0))
        return torch.logsumexp(torch.stack(parts), 0) - math.log(k)

    def default_chunk(self, batch: int) -> int:
        """Importance samples per chunk for a batch of ``batch`` examples: about 2^25 decoder activations."""
        per_sample = 0
        for m in self.decoder.modules():
            if isinstance(m, nn.Linear):
                per_sample += m.out_features
            elif isinstance(m, nn.Conv2d):
                per_sample += m.out_channels * math.prod(self.event_shape[1:])
        return max(1, (1 << 25) // max(1, per_sample * batch))

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The training objective per example, a lower bound on ``log p(x)``: the ELBO (``k = 1``)
        or ``IWAE_k`` (``k > 1``, the recipe's ``k``). Shape ``(B,)``."""
        if self.k == 1:
            return self.elbo(x, context)[0]
        return self.iwae(x, self.k, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob` (so wrappers that call the module, e.g. DDP, train the bound)."""
        return self.log_prob(x, context)

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, shape: int | Sequence[int] = (), context: Tensor | None = None, temperature: float = 1.0,
               decoder_noise: bool = True) -> Tensor:
        """Draws ``x ~ p(x | z)`` with ``z ~ N(0, temperature^2 I)``; shape ``(*shape, *event_shape)``.

        ``decoder_noise=False`` returns the decoder's location instead (the mean for vectors, the
        median ``sigmoid(m(z))`` mapped back for images): the smooth pictures usually shown as
        "VAE samples", which are not samples of the model's density.
        """
        shape = torch.Size((shape,) if isinstance(shape, int) else tuple(shape))
        n = math.prod(shape)
        if context is not None:
            if shape and context.dim() > 1 and context.shape[0] != n:
                raise ValueError(f"context has batch size {context.shape[0]}, the sample shape "
                                 f"{tuple(shape)}")
            context = context.expand(n, context.shape[-1]) if context.dim() == 1 else context
        z = temperature * torch.randn(n, self.latent, dtype=self.dtype, device=self._anchor.device)
        loc, log_scale = self.decode(z, context)
        t = loc + log_scale.exp() * torch.randn_like(loc) if decoder_noise else loc
        x = t if self.preprocess is None else self.preprocess.inverse(t)[0]
        return x.reshape(*shape, *self.event_shape)

    def extra_repr(self) -> str:
        return (f"event_shape={tuple(self.event_shape)}, latent={self.latent}, "
                f"likelihood={self.likelihood!r}, k={self.k}")


@recipe
def vae(event_shape: Sequence[int], latent: int = 0, arch: str = "auto", hidden: Sequence[int] = (256, 256),
        hidden_channels: int = 32, blocks: int = 1, levels: int = -1, bottleneck: int = 4,
        likelihood: str = "auto", alpha: float = 0.05, k: int = 1, context_features: int = 0) -> VAE:
    """A VAE baseline for vectors ``(D,)`` or images ``(C, H, W)`` in ``[0, 1]`` (dequantized pixels).

    Args:
        event_shape: the data's shape (filled in from the data by the CLI).
        latent: latent size (``0``: :func:`default_latent`).
        arch: ``"mlp"`` (MLP encoder and decoder with ``hidden`` layers), ``"conv"`` (images:
            ResNet levels of width ``hidden_channels`` with ``blocks`` residual blocks each, ``levels``
            2x downsamplings (``-1``: :func:`default_levels`) and ``bottleneck`` channels before the
            linear map to the latent), or ``"auto"`` (``conv`` for images, ``mlp`` for vectors).
        likelihood: ``"gaussian"``, ``"logit_gaussian"`` (data in ``[0, 1]``) or ``"auto"``
            (``logit_gaussian`` for images, ``gaussian`` for vectors).
        alpha: the logit's squeeze (the flow recipes' default 0.05).
        k: ``log_prob`` is the ELBO for ``k = 1`` and the IWAE bound with ``k`` samples for ``k > 1``.
        context_features: size of an optional context (e.g. a one-hot label) seen by both networks.

    Returns:
        A :class:`VAE` with ``recipe`` set (so :func:`pushforward.load` rebuilds it).

    References:
        Kingma & Welling, "Auto-Encoding Variational Bayes", 2014.
    """
    event_shape = tuple(int(s) for s in event_shape)
    image = len(event_shape) == 3
    if len(event_shape) not in (1, 3):
        raise ValueError(f"vae models vectors (D,) or images (C, H, W), got event shape {event_shape}")
    dims = math.prod(event_shape)
    latent = latent or default_latent(dims)
    arch = ("conv" if image else "mlp") if arch == "auto" else arch
    likelihood = ("logit_gaussian" if image else "gaussian") if likelihood == "auto" else likelihood
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS} or 'auto', got {arch!r}")
    if arch == "conv":
        if not image:
            raise ValueError(f"arch 'conv' needs images (C, H, W), got event shape {event_shape}")
        _, h, w = event_shape
        levels = default_levels(h, w) if levels < 0 else levels
        if h % (1 << levels) or w % (1 << levels):
            raise ValueError(f"vae downsamples {levels} time(s), so height and width must be divisible by "
                             f"{1 << levels}; got {h}x{w}")
        encoder: nn.Module = _ConvEncoder(event_shape, 2 * latent, hidden_channels, blocks, levels,
                                          bottleneck, context_features)
        decoder: nn.Module = _ConvDecoder(event_shape, latent, hidden_channels, blocks, levels,
                                          bottleneck, context_features)
    else:
        encoder = _FlatMLP(event_shape, dims, 2 * latent, tuple(hidden), context_features)
        decoder = MLP(latent, 2 * dims, context_features, hidden=tuple(hidden))
    return VAE(event_shape, encoder, decoder, latent, likelihood, alpha, k)


class _FlatMLP(nn.Module):
    """An :class:`~pushforward.nn.MLP` on the flattened event (so images can use the MLP architecture too)."""

    def __init__(self, event_shape, dims, out_features, hidden, context_features):
        super().__init__()
        self.net = MLP(dims, out_features, context_features, hidden=hidden)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x.flatten(1), context)
