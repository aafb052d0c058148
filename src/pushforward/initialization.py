"""Data-dependent initialisation, from a batch you choose.

Some layers set their parameters from the statistics of data: :class:`~pushforward.transforms.ActNorm`
normalises each channel of the first batch it sees. Left implicit, "the first batch" is whatever
reaches the layer first in training mode -- a single sample of a smoke test, a validation batch run
by hand before training. :func:`initialize` names the batch; :func:`pushforward.train.fit` calls it
on its first training batch.

The rules every data-dependent layer follows:

- it is the identity until it is initialised, and only its ``forward`` (data -> latent) in
  training mode initialises it implicitly, so evaluating a model (``flow.eval()``: validation,
  :func:`pushforward.train.evaluate`) never changes it;
- an empty batch does not initialise it (and does not mark it initialised);
- statistics that cannot define a parameter give a documented fallback or a ``ValueError`` that
  leaves it unchanged (for ActNorm: a constant feature is only centred; non-finite data is an error).

A layer counts as data-dependent when it has a boolean ``initialized`` buffer and a
``reset_initialization()`` method (ActNorm has both), so a custom layer can take part too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["data_dependent", "initialize", "is_initialized"]


def data_dependent(flow: nn.Module) -> list[nn.Module]:
    """The layers of ``flow`` that are initialised from data (each once, in ``flow.modules()`` order)."""
    return [
        m for m in flow.modules()
        if isinstance(getattr(m, "initialized", None), Tensor)
        and callable(getattr(m, "reset_initialization", None))
    ]


def is_initialized(flow: nn.Module) -> bool:
    """Whether every data-dependent layer of ``flow`` (or ``flow`` itself, if it is one) is initialised.

    ``True`` when there is none.
    """
    return all(bool(m.initialized) for m in data_dependent(flow))


def initialize(flow: nn.Module, x: Tensor, context: Tensor | None = None) -> nn.Module:
    """(Re)initialises every data-dependent layer of ``flow`` (ActNorm) from the batch ``x``.

    Each layer is reset, then ``flow.log_prob(x, context)`` runs once without gradients (a bare
    :class:`~pushforward.core.Transform`: ``flow(x, context)``), so each layer is initialised on
    ``x`` as transformed by the layers before it: afterwards every ActNorm's output on ``x`` has
    zero mean and unit standard deviation per channel. The modes (``train``/``eval``) of ``flow``
    and its layers are left as they were. Under ``torch.distributed`` call it on every process,
    each with its part of the batch: the statistics are those of all parts together.

    Call it before anything else evaluates the flow in training mode, e.g. in a training
    framework's setup hook (Lightning: ``on_fit_start``) with a training batch;
    :func:`pushforward.train.fit` does this itself for layers not yet initialised.

    Args:
        flow: a :class:`~pushforward.core.Flow` (or any module whose layers include data-dependent ones).
        x: a batch ``(B, *event_shape)`` with ``B > 0``, in the flow's dtype and on its device.
        context: the batch's context ``(B, context_features)``, for a conditional flow.

    Returns:
        ``flow``, initialised.

    Raises:
        ValueError: ``x`` is empty, its statistics are not finite, or a data-dependent layer was not
            reached by the forward pass (e.g. inside an :class:`~pushforward.core.Inverse`). Every
            layer is then restored to its state before the call: a failed initialisation changes nothing.
    """
    return initialize_layers(flow, x, context, data_dependent(flow))


def initialize_layers(flow: nn.Module, x: Tensor, context: Tensor | None,
                      layers: Sequence[nn.Module]) -> nn.Module:
    """:func:`initialize` for the given data-dependent ``layers`` of ``flow`` only.

    The other layers keep their initialisation.
    """
    if not layers:
        return flow
    before = [({k: v.clone() for k, v in m.state_dict().items()}, m.training) for m in layers]
    try:
        for m in layers:
            layer: Any = m  # data-dependent: has reset_initialization() and an `initialized` buffer
            layer.reset_initialization()
            m.train(True)  # the layers initialise in training mode only
        with torch.no_grad():
            if hasattr(flow, "log_prob"):
                model: Any = flow  # a Flow, or another model scored by its log_prob (the VAE)
                model.log_prob(x, context)
            else:
                flow(x, context)
        missed = [name for name, m in flow.named_modules()
                  if any(m is chosen for chosen in layers) and not bool(m.initialized)]
        if missed:
            if x.shape[0] == 0:
                raise ValueError(f"cannot initialise from an empty batch (shape {tuple(x.shape)})")
            raise ValueError(
                f"{len(missed)} data-dependent layer(s) were not reached by the forward pass, so they could "
                f"not be initialised: {', '.join(missed)}"
            )
    except BaseException:
        for m, (state, _) in zip(layers, before):
            m.load_state_dict(state)
        raise
    finally:
        for m, (_, training) in zip(layers, before):
            m.train(training)
    return flow
