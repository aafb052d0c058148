"""The contract: transforms, their composition, and the flow they define.

A :class:`Transform` is a bijective ``nn.Module``. Its ``forward`` maps **data to latent** (the
direction used for training and density evaluation) and its ``inverse`` maps latent to data. Both
return ``(y, ladj)`` where ``ladj`` is the log absolute determinant of the Jacobian of the map that
was applied, already summed over the event dimensions, so ``ladj.shape`` is the batch shape.

A :class:`Flow` pairs a transform ``f`` with a base density ``p_z`` and evaluates the change of
variables formula ``log p(x) = log p_z(f(x)) + log|det Df(x)|``.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from collections.abc import Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from .initialization import is_initialized
from .protocols import BaseDistribution

__all__ = [
    "Compose",
    "Flow",
    "FlowDistribution",
    "Inverse",
    "InvertibilityWarning",
    "Transform",
    "conditioners",
    "context_features",
    "model_dtype",
    "set_validation",
    "shape_checks_enabled",
    "sum_event",
    "validation_enabled",
]

_VALIDATION = True
_NO_SCRIPT = ("pushforward flows and transforms cannot be compiled by TorchScript (torch.jit.script): they "
              "use Python features it lacks (and torch deprecates TorchScript). Use "
              "torch.compile(flow.log_prob), or torch.export.export of a module whose forward calls "
              "flow.log_prob (docs: Inside other libraries)")


def set_validation(enabled: bool) -> None:
    """Switches every input check of pushforward on or off (flows, domains of pointwise transforms).

    Checks of values (finiteness, domains) cost a host synchronisation per call; they are skipped
    while tracing (``torch.compile``, ``torch.export``, ``torch.jit.trace``) and under
    ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``), where a value cannot be inspected.
    """
    global _VALIDATION
    _VALIDATION = bool(enabled)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def validation_enabled() -> bool:
    """Whether checks of input *values* run now.

    True when checks are enabled (:func:`set_validation`) and the inputs are concrete tensors: not
    while tracing under ``torch.compile``, ``torch.export`` or ``torch.jit.trace``, and not under a
    ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...), whose inputs carry no value a
    Python branch could look at.
    """
    return _VALIDATION and not _tracing() and not torch._C._are_functorch_transforms_active()


def shape_checks_enabled() -> bool:
    """Whether checks of input *shapes and dtypes* run now: enabled, and not tracing (they need no value)."""
    return _VALIDATION and not _tracing()


class InvertibilityWarning(RuntimeWarning):
    """Samples where a flow is not invertible at its floating-point precision.

    Raised by :meth:`Flow.sample_and_log_prob` where :meth:`Flow.log_prob` of a returned sample disagrees
    with the returned log-density beyond rounding.
    """


def sum_event(x: Tensor, event_dim: int) -> Tensor:
    """Sums ``x`` over its ``event_dim`` trailing dimensions.

    This turns elementwise log-derivatives into a log-determinant per event, which is how every
    transform reduces its ``ladj`` to the batch shape.

    Args:
        x: a tensor of shape ``(*batch, *event)`` with ``len(event) == event_dim``.
        event_dim: number of trailing (event) dimensions to sum over; ``0`` returns ``x`` itself.

    Returns:
        A tensor of shape ``(*batch,)``, i.e. ``x.shape[:x.dim() - event_dim]``.
    """
    if event_dim == 0:
        return x
    if event_dim == 1:
        return x.sum(-1)
    return x.sum(dim=tuple(range(-event_dim, 0)))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating-point dtype of ``model``: that of its first floating parameter (or buffer).

    Returns torch's default dtype when the model holds no floating tensor.
    """
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def context_features(module: nn.Module) -> int:
    """The width of the context vector that the layers inside ``module`` read; 0 if none reads one.

    A layer declares that it reads a context by an integer attribute ``context_features > 0`` (the
    conditioners of :mod:`pushforward.nn` do). Computed from the modules as they are now, so it
    follows layers that are replaced or appended.

    Raises:
        ValueError: If two layers declare different widths (they all receive the same context).
    """
    widths = {int(w) for m in module.modules()
              if isinstance(w := getattr(m, "context_features", 0), int) and w > 0}
    if len(widths) > 1:
        raise ValueError(f"the layers of this flow read contexts of different widths {sorted(widths)}; "
                         "every layer receives the same context")
    return widths.pop() if widths else 0


def conditioners(module: nn.Module) -> list[nn.Module]:
    """Every conditioner network inside ``module``: what :meth:`Transform.conditioners` of its layers return.

    Computed from the modules as they are now, in ``module.modules()`` order, each network once.
    """
    nets: dict[int, nn.Module] = {}
    for m in module.modules():
        if isinstance(m, Transform):
            for net in m.conditioners():
                nets.setdefault(id(net), net)
    return list(nets.values())


class Transform(nn.Module):
    """A bijection with a tractable log-determinant.

    Subclasses implement :meth:`forward` (data -> latent) and :meth:`inverse` (latent -> data).
    Each returns ``(y, ladj)`` with ``ladj`` of shape ``x.shape[:-event_dim]``. ``context`` is an
    optional conditioning tensor of shape ``(*batch, context_features)``; transforms that do not
    use it ignore it.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps data to latent: ``z = f(x)``.

        Args:
            x: data of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(z, ladj)``: ``z`` of the same shape as ``x``, and ``ladj = log|det Df(x)|``
            summed over the event dimensions, of shape ``(*batch,)`` (``x.shape[:-event_dim]``).
        """
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps latent to data: ``x = f^{-1}(z)``.

        Args:
            z: latent of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)``: ``x`` of the same shape as ``z``, and ``ladj = log|det Df^{-1}(z)|``
            (``= -log|det Df(x)|``) summed over the event dimensions, of shape ``(*batch,)``.
        """
        raise NotImplementedError

    @property
    def inv(self) -> Transform:
        """The inverse transform, as a module sharing this one's parameters."""
        return Inverse(self)

    def conditioners(self) -> list[nn.Module]:
        """The networks of this layer alone (not of layers inside it) that compute its parameters; none here.

        Structures (coupling, autoregressive) return their conditioner; :func:`conditioners` collects
        them over a whole flow, e.g. to run them under autocast.
        """
        return []

    def __prepare_scriptable__(self):
        raise TypeError(_NO_SCRIPT)


class Inverse(Transform):
    """Swaps the two directions of ``transform`` (sharing its parameters).

    Example: ``Inverse(Logit())`` is the sigmoid, with the log-determinants exchanged.
    """

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the wrapped transform's :meth:`~Transform.inverse`.

        Args:
            x: input of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(y, ladj)`` as returned by ``transform.inverse(x, context)``; ``ladj`` has shape
            ``(*batch,)``.
        """
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the wrapped transform's :meth:`~Transform.forward`.

        Args:
            z: input of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)`` as returned by ``transform(z, context)``; ``ladj`` has shape ``(*batch,)``.
        """
        return self.transform(z, context)

    @property
    def inv(self) -> Transform:
        return self.transform


class Compose(Transform):
    """The composition ``f = f_n o ... o f_1`` applied in the order given (data -> latent).

    The only place that loops over layers and sums their log-determinants:
    ``log|det Df(x)| = sum_i log|det Df_i(y_{i-1})|`` (lecture: function composition).

    Every layer is called through ``nn.Module.__call__`` (forward) or its ``inverse``, one by one,
    and nothing about the layers is cached: replacing or appending a layer, hooks,
    ``torch.nn.utils.parametrize``, weight or spectral norm and ``.to()`` all take effect at once.
    """

    def __init__(self, *transforms: Transform):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], Sequence):
            transforms = tuple(transforms[0])
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"Compose expects Transform modules, got {type(t).__name__} at position {i}")
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the layers in order (data -> latent), summing their log-determinants.

        Args:
            x: data of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``, passed
                to every layer.

        Returns:
            ``(z, ladj)`` with ``ladj = sum_i log|det Df_i|`` of shape ``(*batch,)``.

        Raises:
            ValueError: If the composition holds no transforms.
        """
        ladj = None
        for t in self.transforms:
            x, step = t(x, context)
            ladj = step if ladj is None else ladj + step
        return x, self._total(ladj)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the layers' inverses in reverse order (latent -> data), summing their log-determinants.

        Args:
            z: latent of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)`` with ``ladj = log|det Df^{-1}(z)|`` of shape ``(*batch,)``.

        Raises:
            ValueError: If the composition holds no transforms.
        """
        ladj = None
        for t in reversed(self.transforms):
            z, step = cast(Transform, t).inverse(z, context)
            ladj = step if ladj is None else ladj + step
        return z, self._total(ladj)

    @staticmethod
    def _total(ladj: Tensor | None) -> Tensor:
        if ladj is None:
            raise ValueError("Compose() of no transforms has no batch shape; add at least one transform")
        return ladj

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return cast(Transform, self.transforms[i])


class Flow(nn.Module):
    """A normalizing flow: the pushforward of ``base`` through the inverse of ``transform``.

    Args:
        transform: maps data ``x`` of shape ``(*batch, *event_shape)`` to latents of the same
            shape as the base's events.
        base: the base density ``p_z``, a :class:`~pushforward.protocols.BaseDistribution` (see
            :mod:`pushforward.distributions`).
        embedding: optional module applied once to ``context`` before any transform sees it.
        validate: check inputs (shape, dtype, finiteness) with clear errors; skipped under
            ``torch.compile`` and when :func:`set_validation` switched all checks off.

    ``flow(context)`` returns a genuine :class:`torch.distributions.Distribution`.

    Attributes:
        recipe: ``{"recipe": name, "kwargs": {...}}``, set by the recipes of :mod:`pushforward.models`
            so the flow can be rebuilt and saved (:func:`pushforward.models.build`, :func:`pushforward.save`);
            ``None`` for a flow assembled by hand.

    Raises:
        TypeError: If ``transform`` is not a :class:`Transform` or ``base`` lacks ``event_shape``,
            ``log_prob`` or ``sample``.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """

    transform: Transform
    base: BaseDistribution
    embedding: nn.Module | None
    recipe: dict | None

    def __init__(
        self,
        transform: Transform,
        base: BaseDistribution,
        embedding: nn.Module | None = None,
        validate: bool = True,
    ):
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(f"Flow expects a Transform (e.g. Compose(...)), got {type(transform).__name__}")
        if not isinstance(base, BaseDistribution):
            raise TypeError("Flow's base needs event_shape, log_prob(z, context) and sample(shape, context, "
                            "temperature) (pushforward.protocols.BaseDistribution), got "
                            f"{type(base).__name__}")
        self.transform = transform
        self.base = base
        self.embedding = embedding
        self.validate = validate
        self.recipe = None

    @property
    def event_shape(self) -> torch.Size:
        return self.base.event_shape

    # -- helpers -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The flow's floating-point dtype: that of its first floating parameter (or buffer)."""
        return model_dtype(self)

    def _context_width(self) -> tuple[bool, int | None]:
        """``(conditional, width)`` of the context users pass (before the embedding).

        Width ``None``: unknown.
        """
        base = context_features(self.base) if isinstance(self.base, nn.Module) else 0
        inner = max(context_features(self.transform), base)
        if self.embedding is None:
            return inner > 0, inner
        return True, getattr(self.embedding, "in_features", None)

    def _check_context(self, context: Tensor | None, batch: torch.Size | None, what: str) -> None:
        """Checks a given ``context`` against what the flow's layers read (shapes; values if enabled).

        A missing context is left to the conditioners, which name the width they were built for: the
        walk over the modules that finds the width costs ~90 us per call on an 8-layer realnvp (5% of
        its log_prob), too much for the unconditional flows that every call would pay it for.
        """
        if context is None:
            return
        conditional, width = self._context_width()
        if not isinstance(context, Tensor):
            raise TypeError(f"{what}: context must be a torch.Tensor, got {type(context).__name__}")
        if not conditional:
            raise ValueError(f"{what}: this flow has no layer that reads a context, got a context of shape "
                             f"{tuple(context.shape)}; build the flow with context_features=... to condition "
                             "it")
        if context.dim() < 1 or (width is not None and context.shape[-1] != width):
            raise ValueError(f"{what}: context must have shape (*batch, {width}), got {tuple(context.shape)}")
        dtype = self.dtype
        if context.dtype != dtype:
            raise TypeError(f"{what}: context must be {dtype} like the flow, got {context.dtype}")
        if batch is not None:
            try:
                torch.broadcast_shapes(batch, context.shape[:-1])
            except RuntimeError:
                raise ValueError(f"{what}: the context's batch shape {tuple(context.shape[:-1])} does not "
                                 f"broadcast against the input's batch shape {tuple(batch)}") from None
        if validation_enabled() and not bool(torch.isfinite(context).all()):
            bad = (~torch.isfinite(context)).sum().item()
            raise ValueError(f"{what} got {bad} non-finite value(s) (NaN or Inf) in its context")

    def _check(self, x: Tensor, context: Tensor | None, what: str) -> None:
        shape = tuple(self.event_shape)
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} expects a torch.Tensor of event shape {shape}, got {type(x).__name__}")
        if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
            raise ValueError(
                f"{what} expects a tensor of shape (*batch, {', '.join(map(str, shape))}), "
                f"got shape {tuple(x.shape)}"
            )
        dtype = self.dtype
        if x.dtype != dtype:
            hint = ("" if x.is_floating_point()
                    else "; dequantize integer data first (pushforward.data.dequantize)")
            raise TypeError(f"{what} expects a {dtype} tensor (the flow's dtype), got {x.dtype}{hint}")
        if validation_enabled() and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).sum().item()
            raise ValueError(f"{what} got {bad} non-finite value(s) (NaN or Inf) in its input")
        self._check_context(context, x.shape[: x.dim() - len(shape)], what)

    def embed_context(self, context: Tensor | None) -> Tensor | None:
        """The context as the transforms see it: ``embedding(context)`` when the flow has an embedding.

        Args:
            context: ``None`` or a tensor of shape ``(*batch, context_features)``.

        Returns:
            ``None`` or the embedded context, of shape ``(*batch, embedded_features)``.
        """
        if context is not None and self.embedding is not None:
            context = self.embedding(context)
        return context

    def _flatten(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None, torch.Size]:
        """Flattens batch dims to one, broadcasting ``context`` against them."""
        nd = len(self.event_shape)
        batch = x.shape[: x.dim() - nd]
        if context is not None:
            cbatch = context.shape[:-1]
            batch = torch.broadcast_shapes(batch, cbatch)
            x = x.expand(*batch, *self.event_shape)
            context = context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])
        return x.reshape(-1, *self.event_shape), context, batch

    # -- the model ---------------------------------------------------------------------------
    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x) = log p_z(f(x)) + log|det Df(x)|``; shape ``(*batch,)``."""
        if self.validate and shape_checks_enabled():
            self._check(x, context, "log_prob")
        context = self.embed_context(context)
        x, context, batch = self._flatten(x, context)
        z, ladj = self.transform(x, context)
        return (self.base.log_prob(z, context) + ladj).reshape(batch)

    def _sample_shape(self, shape: int | Sequence[int], context: Tensor | None) -> torch.Size:
        shape = torch.Size((shape,) if isinstance(shape, int) else tuple(shape))
        if context is not None:
            shape = shape + context.shape[:-1]
        return shape

    def _sample(self, shape, context, temperature, with_log_prob: bool):
        if self.validate and shape_checks_enabled():
            self._check_context(context, None, "sample_and_log_prob" if with_log_prob else "sample")
        context = self.embed_context(context)
        shape = self._sample_shape(shape, context)
        n = math.prod(shape)
        if context is not None:
            context = context.expand(*shape, context.shape[-1]).reshape(n, context.shape[-1])
        z = self.base.sample((n,), context, temperature=temperature)
        x, ladj = self.transform.inverse(z, context)
        if not with_log_prob:
            return x.reshape(*shape, *self.event_shape)
        log_prob = self.base.log_prob(z, context) - ladj
        if self.validate and validation_enabled():
            self._check_inverse(x, log_prob, context)
        return x.reshape(*shape, *self.event_shape), log_prob.reshape(shape)

    def _check_inverse(self, x: Tensor, log_prob: Tensor, context: Tensor | None) -> None:
        """Warns where :meth:`log_prob` at the samples ``x`` disagrees with ``log_prob``, their log-density
        from the inverse pass, beyond rounding (``sqrt(eps) * (1 + |log_prob|)``; NaN counts as a
        disagreement). One forward pass without grad; skipped while a layer would initialise itself from
        it (ActNorm before its first batch, in training mode).
        """
        if self.training and not is_initialized(self.transform):  # never initialise ActNorm from samples
            return
        with torch.no_grad():
            z, ladj = self.transform(x.detach(), context)
            lp = log_prob.detach()
            gap = (self.base.log_prob(z, context) + ladj - lp).abs()
            bad = ~(gap <= math.sqrt(torch.finfo(lp.dtype).eps) * (1 + lp.abs()))
            if not bool(bad.any()):
                return
            count, worst = int(bad.sum()), float(gap[bad].nan_to_num(nan=math.inf).max())
            largest = float(x.detach().abs().amax())
        warnings.warn(
            f"sample_and_log_prob: for {count} of {bad.numel()} samples, log_prob of the returned sample "
            f"differs from the returned log-density by up to {worst:.3g} nats: the flow is not invertible in "
            f"{lp.dtype} there (its inverse maps those latents far out, samples up to |x| = {largest:.3g}, "
            "where rounding x moves f(x) far from the drawn latent). The returned log-density is the model's "
            "density at the exact preimage of each latent; log_prob at the rounded samples is not reliable "
            "there. This typically follows training on unstandardised data (features on scales far from 1): "
            "standardise the features (pushforward.data.load_table(standardize=True), or an ActNorm "
            "first layer), or sample in float64 (flow.double()). The check costs one forward pass; "
            "Flow(validate=False) or pushforward.set_validation(False) skips it.",
            InvertibilityWarning,
            stacklevel=4,
        )

    def sample(
        self, shape: int | Sequence[int] = (), context: Tensor | None = None, temperature: float = 1.0
    ) -> Tensor:
        """Draws samples of shape ``(*shape, *context_batch, *event_shape)``.

        ``temperature`` scales the base's spread (0 gives the base mode pushed through the flow).
        """
        return self._sample(shape, context, temperature, with_log_prob=False)

    def rsample(
        self, shape: int | Sequence[int] = (), context: Tensor | None = None, temperature: float = 1.0
    ) -> Tensor:
        """Same as :meth:`sample`; samples are differentiable with respect to the parameters."""
        return self.sample(shape, context, temperature)

    def sample_and_log_prob(
        self, shape: int | Sequence[int] = (), context: Tensor | None = None, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Samples and their model log-density in one inverse pass.

        The log-density is the model's (temperature 1) density at the exact preimage ``f^{-1}(z)`` of
        each drawn latent ``z``, of which the returned sample is the rounding:
        ``log p_z(z) - log|det Df^{-1}(z)|``. Where the flow is invertible at its precision this is
        :meth:`log_prob` of the returned sample up to rounding. With validation on (the default; with
        or without grad), one extra forward pass, run without grad, checks this and warns
        (:class:`InvertibilityWarning`) about samples where it is not: a flow whose inverse sends some
        latents to huge values (typically one trained on unstandardised data) has a density that one
        rounding of ``x`` changes by many nats. The check costs that forward pass (about as much as the
        sampling pass for couplings and MAF; D passes for IAF, whose forward is sequential):
        ``Flow(validate=False)`` or :func:`set_validation` turn it off, e.g. in a variational training
        loop once the flow is known to be well conditioned.
        """
        return self._sample(shape, context, temperature, with_log_prob=True)

    def forward(self, context: Tensor | None = None) -> FlowDistribution:
        """Returns the distribution ``p(x | context)`` as a :class:`torch.distributions.Distribution`.

        When Pyro is imported, the view is also a Pyro distribution (:mod:`pushforward.pyro`), usable
        as a ``pyro.sample`` site and inside plates; Pyro is never imported by pushforward itself.

        Args:
            context: optional context of shape ``(*batch, context_features)``.

        Returns:
            A :class:`FlowDistribution` with ``batch_shape = context.shape[:-1]``.

        Raises:
            ValueError: If the context does not fit the flow.
        """
        if "pyro.distributions" in sys.modules:
            from .pyro import PyroFlowDistribution

            return PyroFlowDistribution(self, context)
        return FlowDistribution(self, context)

    def __prepare_scriptable__(self):
        raise TypeError(_NO_SCRIPT)

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}"


class _Method(nn.Module):
    """Calls a method of ``flow`` through ``nn.Module.__call__``.

    So ``torch.func.functional_call`` can run it.
    """

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, method: str, *args):
        return getattr(self.flow, method)(*args)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


class FlowDistribution(Distribution):
    """A :class:`torch.distributions.Distribution` view of a :class:`Flow` at a given context.

    Made by ``flow(context)``. Like any torch distribution it holds the tensors it was made from: the
    flow's parameters and buffers at that moment (by reference, so in-place updates such as optimiser
    steps show). A view made inside ``torch.func.functional_call(flow, params, (context,))`` therefore
    keeps evaluating with ``params`` (gradients reach them) after the call returns. If the flow's
    tensors were since replaced by others of a different shape, dtype or device, or layers were added
    or removed, using the view is an error: make a new one.

    Args:
        flow: the flow.
        context: optional context of shape ``(*batch, context_features)``; its batch shape is the
            view's ``batch_shape``.
        batch_shape: optional batch shape to broadcast to (what :meth:`expand` sets).

    Raises:
        ValueError: If the context does not fit the flow (see :meth:`Flow.log_prob`).
    """

    has_rsample = True
    arg_constraints: ClassVar[dict] = {}

    def __init__(self, flow: Flow, context: Tensor | None = None, batch_shape: Sequence[int] | None = None):
        if flow.validate and shape_checks_enabled():
            flow._check_context(context, None, "flow(context)")
        self.flow = flow
        self.context = context
        self._held = _tensors(flow)
        if batch_shape is None:
            batch_shape = context.shape[:-1] if context is not None else torch.Size()
        super().__init__(batch_shape=torch.Size(batch_shape), event_shape=flow.event_shape,
                         validate_args=False)

    def _call(self, method: str, *args):
        """Runs ``flow.<method>(*args)`` with the tensors this view holds."""
        current = _tensors(self.flow)
        if current.keys() == self._held.keys() and all(current[k] is t for k, t in self._held.items()):
            return getattr(self.flow, method)(*args)
        changed = next((k for k in current.keys() ^ self._held.keys()), None)
        changed = changed or next((k for k, t in self._held.items()
                                   if (current[k].shape, current[k].dtype, current[k].device)
                                   != (t.shape, t.dtype, t.device)), None)
        if changed is not None:
            raise RuntimeError(
                "this distribution view was made before the flow's layers, dtype or device changed "
                f"(first difference: {changed!r}); make a new view with flow(context)")
        held = {f"flow.{k}": t for k, t in self._held.items()}
        return torch.func.functional_call(_Method(self.flow), held, (method, *args), tie_weights=True)

    def expand(self, batch_shape: Sequence[int], _instance=None) -> FlowDistribution:
        """The same distribution broadcast to ``batch_shape`` (the context is expanded, not copied).

        Args:
            batch_shape: the new batch shape; the current one must broadcast to it.

        Returns:
            A view of the same flow with that batch shape.

        Raises:
            ValueError: If the current batch shape does not broadcast to ``batch_shape``.
        """
        batch_shape = torch.Size(batch_shape)
        try:
            fits = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"cannot expand a flow distribution of batch shape {tuple(self.batch_shape)} "
                             f"to {tuple(batch_shape)}")
        context = None if self.context is None else self.context.expand(*batch_shape, self.context.shape[-1])
        new = type(self).__new__(type(self))
        new.flow, new.context, new._held = self.flow, context, self._held
        Distribution.__init__(new, batch_shape=batch_shape, event_shape=self.event_shape, validate_args=False)
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        """The flow's log-density at ``value`` given this distribution's context (:meth:`Flow.log_prob`).

        Args:
            value: data of shape ``(*batch, *event_shape)``, broadcastable against ``batch_shape``.

        Returns:
            ``log p(value | context)`` of shape ``broadcast(batch, batch_shape)``.
        """
        log_p = self._call("log_prob", value, self.context)
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))

    def _draw(self, method: str, sample_shape: torch.Size | Sequence[int]):
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        if self.context is None:
            return self._call(method, shape + tuple(self.batch_shape), None)
        return self._call(method, shape, self.context)

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """Reparameterised samples (:meth:`Flow.sample` at temperature 1), differentiable in the parameters.

        Args:
            sample_shape: leading shape of the draws.

        Returns:
            Samples of shape ``(*sample_shape, *batch_shape, *event_shape)``.
        """
        return self._draw("sample", sample_shape)

    def sample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """Same as :meth:`rsample`, under ``torch.no_grad()`` (no autograd graph is kept).

        Args:
            sample_shape: leading shape of the draws.

        Returns:
            Samples of shape ``(*sample_shape, *batch_shape, *event_shape)``.
        """
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample_and_log_prob(self, sample_shape: torch.Size | Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """Reparameterised samples and their log-density in one pass (:meth:`Flow.sample_and_log_prob`).

        Args:
            sample_shape (torch.Size | Sequence[int]): leading shape of the draws.

        Returns:
            ``(x, log_prob)``: samples of shape ``(*sample_shape, *batch_shape, *event_shape)`` and
            their log-density of shape ``(*sample_shape, *batch_shape)``.
        """
        return self._draw("sample_and_log_prob", sample_shape)

    @property
    def support(self) -> torch.distributions.constraints.Constraint:
        """All of ``R^event_shape``: an independent real constraint over the event dimensions."""
        return torch.distributions.constraints.independent(torch.distributions.constraints.real,
                                                           len(self.event_shape))

    def _no_closed_form(self, what: str, instead: str):
        raise NotImplementedError(f"a normalizing flow has no closed-form {what}; {instead}")

    @property
    def mean(self) -> Tensor:
        return self._no_closed_form("mean", "estimate it from samples, e.g. d.sample((n,)).mean(0)")

    @property
    def mode(self) -> Tensor:
        return self._no_closed_form("mode", "flow.sample(n, temperature=0.0) pushes the base's mode "
                                            "through the flow, which is not the mode of the flow's "
                                            "density in general")

    @property
    def variance(self) -> Tensor:
        return self._no_closed_form("variance", "estimate it from samples, e.g. d.sample((n,)).var(0)")

    def entropy(self) -> Tensor:
        return self._no_closed_form("entropy", "estimate it by Monte Carlo: x, log_p = "
                                               "d.rsample_and_log_prob((n,)); -log_p.mean(0)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, "
                f"event_shape={tuple(self.event_shape)})")
