"""What training minimises: one small object per objective.

:func:`pushforward.train.fit` and :func:`pushforward.train.evaluate` call nothing but this interface,
so a new objective (flow matching, noise-augmented NLL) is one class here and no change to the loop.
An :class:`Objective` has

- ``loss(model, batch, generator) -> Tensor``: the quantity training minimises, one value per example
  (shape ``(B,)``), in ``unit`` (nats for every objective here), differentiable in the model's
  parameters. The loop minimises its mean divided by the data's dimension.
- ``evaluate(model, batch, generator) -> dict[str, Tensor]``: per-example figures for validation and
  reports, computed without gradients: ``"loss"`` and any extras (the variational dequantizer's
  ``"log_q"``, the ELBO's ``"recon"`` and ``"kl"``). By default ``{"loss": loss(...)}``.
- ``check(model)``: a clear error before anything runs when the model lacks what the objective needs.
- what reports say about the figure: ``name``, ``unit``, ``is_bound`` (an upper bound on the negative
  log-likelihood rather than the value itself), ``levels`` (grey levels of discrete data, for
  bits/dim), :meth:`~Objective.describe` (entries for ``evaluate``'s report) and ``references``
  (other objectives scoring the same model, reported alongside).

Randomness. ``generator`` is a CPU :class:`torch.Generator` that the loop seeds for each batch (the
same on every process). Noise per example is drawn with :meth:`Batch.draw`, which draws it for the
whole global batch and keeps this process's rows, so ``N`` processes see exactly the noise of the
one-process run. Randomness inside the model (the VAE's reparameterisation, the variational
dequantizer's ``q(u | x)``) runs under :func:`seeded_rng`, which seeds torch's global generator from
``generator`` for the duration of the call: validation figures are reproducible and a resumed run
draws what the uninterrupted one drew.

The objectives: :class:`NLL` (exact, continuous data), :class:`UniformDequantization` and
:class:`VariationalDequantization` (bounds for discrete images, around a continuous objective),
:class:`ELBO` (a VAE's ELBO or IWAE_k), :class:`FlowMatching` (a CNF's vector field regressed on
straight-line paths, no ODE solve). :func:`default_objective` is the one place that picks an
objective for a model and its data; :func:`select_objective` picks a training objective by name.

References:
    Theis, van den Oord & Bethge, "A note on the evaluation of generative models", 2016.
    Ho, Chen, Srinivas, Duan & Abbeel, "Flow++", 2019, section 3.1.
    Kingma & Welling, "Auto-Encoding Variational Bayes", 2014.
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", 2016.
    Lipman, Chen, Ben-Hamu, Nickel & Le, "Flow Matching for Generative Modeling", 2023.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from .core import model_dtype
from .metrics import bits_per_dim

__all__ = [
    "ELBO", "NLL", "OBJECTIVES", "Batch", "ColumnDequantization", "Dequantized", "FlowMatching",
    "LatentVariableModel", "LogDensity", "NoiseAugmentation", "Objective", "UniformDequantization",
    "VariationalDequantization",
    "default_objective", "denoise", "model_dtype", "seeded_rng", "select_objective", "with_noise",
]

_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1: dequantized values stay in [0, 1)


@dataclass(frozen=True)
class Batch:
    """A batch as an objective sees it: this process's examples of a global batch.

    Attributes:
        x: ``(B, *event_shape)``: continuous data in the model's dtype, or integer images
            (``0 .. levels - 1``), on the model's device.
        context: ``(B, context_features)`` or ``None``.
        part: the rows of the global batch that ``x`` holds (one process's share under
            ``torchrun``); ``None``: ``x`` is the whole batch.
        total: the number of examples of the global batch (``len(x)`` when ``part`` is ``None``).
    """

    x: Tensor
    context: Tensor | None = None
    part: slice | None = None
    total: int | None = None

    @property
    def size(self) -> int:
        """The number of examples of the global batch."""
        return len(self.x) if self.total is None else self.total

    def draw(self, sample: Callable[[int], Tensor]) -> Tensor:
        """``sample(n)`` for the ``n`` examples of the global batch, restricted to this batch's rows.

        ``sample`` returns one row per example (e.g. ``lambda n: torch.rand(n, *shape, generator=g)``);
        drawing for the global batch and slicing makes the noise independent of the number of processes.
        """
        rows = sample(self.size)
        return rows if self.part is None else rows[self.part]

    def replace(self, **changes: Any) -> Batch:
        """A copy with some fields changed (e.g. ``batch.replace(x=y)``)."""
        return dataclasses.replace(self, **changes)


class LogDensity(Protocol):
    """What :class:`NLL` needs of a model: ``log_prob(x, context) -> (B,)``."""

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor: ...


class LatentVariableModel(Protocol):
    """What :class:`ELBO` needs of a model (:class:`~pushforward.vae.VAE`)."""

    def elbo(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]: ...

    def iwae(self, x: Tensor, k: int, context: Tensor | None = None) -> Tensor: ...


class Dequantized(Protocol):
    """What :class:`VariationalDequantization` needs of a model: ``dequantizer(x, dtype) -> (y, log_q)``."""

    dequantizer: Callable[[Tensor, torch.dtype], tuple[Tensor, Tensor]]


@contextlib.contextmanager
def seeded_rng(batch: Batch, generator: torch.Generator) -> Iterator[None]:
    """A block in which torch's global generators (CPU, ``batch.x``'s device) are seeded from ``generator``.

    The seed is drawn per example of the global batch (:meth:`Batch.draw`) and the first of this
    batch's rows is used, so each process of a ``torchrun`` group draws different noise. The global
    generators are restored afterwards.
    """
    seed = int(batch.draw(lambda n: torch.randint(0, 2**62, (n,), generator=generator))[0])
    device = batch.x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class Objective(ABC):
    """What training minimises; see the module docstring. Subclasses implement :meth:`loss`.

    Attributes:
        name: a short identifier (``"nll"``, ``"elbo"``, ...), recorded in checkpoints and reports.
        unit: the unit of :meth:`loss` per example (``"nats"``).
        is_bound: the loss is an upper bound on the negative log-likelihood, not the value itself.
        levels: grey levels of the discrete data the figure is reported for in bits/dim (``None``:
            continuous data, no bits/dim).
    """

    name: str = "objective"
    unit: str = "nats"
    is_bound: bool = False
    levels: int | None = None

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        """The per-example loss ``(B,)`` of ``batch``, differentiable in ``model``'s parameters."""

    def evaluate(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        """Per-example figures ``(B,)`` for reports: ``"loss"`` and any extras. Called under ``no_grad``."""
        return {"loss": self.loss(model, batch, generator)}

    def check(self, model: nn.Module) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Raises ``TypeError`` when ``model`` lacks what this objective needs (nothing by default)."""

    def describe(self) -> dict[str, Any]:
        """Entries that :func:`pushforward.train.evaluate` adds to its report."""
        return {}

    @property
    def references(self) -> dict[str, Objective]:
        """Other objectives that score the same model, reported as ``<name>_nll`` etc. by ``evaluate``."""
        return {}

    def bits_per_dim(self, nats: float, dims: int) -> float | None:
        """``nats`` per example as bits per dimension of the discrete data; ``None`` without ``levels``."""
        return None if self.levels is None else float(bits_per_dim(nats, dims, self.levels))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NLL(Objective):
    """The exact negative log-likelihood ``-log p(x | context)`` of continuous data, in nats.

    Calls ``model.log_prob(x, context)``: any model with that method (a :class:`~pushforward.core.Flow`,
    or your own module) trains with it.
    """

    name = "nll"

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        if not batch.x.is_floating_point():
            raise TypeError(f"NLL needs continuous data, got {batch.x.dtype}; discrete images are trained "
                            "with UniformDequantization(levels) or VariationalDequantization(levels)")
        return -cast(LogDensity, model).log_prob(batch.x, batch.context)


class ELBO(Objective):
    """A VAE's negative ELBO (``k = 1``) or negative ``IWAE_k`` (``k > 1``), an upper bound on ``-log p(x)``.

    Calls ``model.elbo(x, context)`` or ``model.iwae(x, k, context)`` (:class:`~pushforward.vae.VAE`);
    the reparameterisation noise is drawn under :func:`seeded_rng`. With ``k = 1``, :meth:`evaluate`
    also reports the two terms: ``recon = E_q[log p(x | z)]`` and ``kl = KL(q(z | x) || p(z))``.

    Args:
        k: importance samples.

    References:
        Kingma & Welling, "Auto-Encoding Variational Bayes", 2014; Burda, Grosse & Salakhutdinov,
        "Importance Weighted Autoencoders", 2016.
    """

    is_bound = True

    def __init__(self, k: int = 1):
        if k < 1:
            raise ValueError(f"ELBO needs k >= 1 importance samples, got {k}")
        self.k = k
        self.name = "elbo" if k == 1 else f"iwae{k}"

    def _terms(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[Tensor, ...]:
        vae = cast(LatentVariableModel, model)
        with seeded_rng(batch, generator):
            if self.k == 1:
                return vae.elbo(batch.x, batch.context)
            return (vae.iwae(batch.x, self.k, batch.context),)

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        return -self._terms(model, batch, generator)[0]

    def evaluate(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        terms = self._terms(model, batch, generator)
        if self.k == 1:
            return {"loss": -terms[0], "recon": terms[1], "kl": terms[2]}
        return {"loss": -terms[0]}

    def check(self, model: nn.Module) -> None:
        if not callable(getattr(model, "elbo" if self.k == 1 else "iwae", None)):
            raise TypeError(f"{self!r} needs a latent-variable model with elbo(x, context) and "
                            f"iwae(x, k, context) (pushforward.vae.VAE), got a {type(model).__name__}")

    def describe(self) -> dict[str, Any]:
        return {"bound": "negative ELBO" if self.k == 1 else f"negative IWAE (k={self.k})"}

    def __repr__(self) -> str:
        return f"ELBO(k={self.k})"


class _Dequantization(Objective):
    """An objective that makes discrete data continuous, ``y``, and scores ``y`` with ``objective``.

    Holds the wrapped continuous objective (default :class:`NLL`), names itself after it and asks it
    what the model needs. Subclasses set ``kind`` and implement ``loss``.
    """

    is_bound = True
    kind: str = "dequantization"

    def __init__(self, objective: Objective | None = None):
        self.objective = objective if objective is not None else NLL()
        self.name = f"{self.kind}({self.objective.name})"

    def check(self, model: nn.Module) -> None:
        self.objective.check(model)


def _grey_levels(who: str, levels: int) -> int:
    if levels < 2:
        raise ValueError(f"{who} needs levels >= 2, got {levels}")
    return levels


class UniformDequantization(_Dequantization):
    """The uniform-dequantization bound on discrete images: ``objective`` on ``y = (x + u) / levels``.

    ``u ~ U[0, 1)^D`` is drawn afresh for every batch (float32, from ``generator``; ``y`` is then cast
    to the model's dtype). The loss is ``objective``'s loss of ``y`` (default :class:`NLL`:
    ``-log p(y)``), and ``NLL(y) + D log levels`` bounds the code length of the discrete ``x``, so
    bits/dim ``= (loss + D ln levels) / (D ln 2)`` (:func:`pushforward.metrics.bits_per_dim`).

    Args:
        levels: grey levels ``K`` of the data (integers ``0 .. K - 1``).
        objective: the continuous objective applied to ``y`` (:class:`NLL`, or :class:`ELBO` for a VAE).

    References:
        Theis, van den Oord & Bethge, "A note on the evaluation of generative models", 2016.
    """

    kind = "uniform_dequantization"
    levels: int

    def __init__(self, levels: int, objective: Objective | None = None):
        super().__init__(objective)
        self.levels = _grey_levels("UniformDequantization", levels)

    def dequantize(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
        """The batch with ``x`` replaced by ``y = (x + u) / levels`` in ``[0, 1)``, in the model's dtype."""
        x = batch.x
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"uniform dequantization needs integer images in [0, {self.levels - 1}], "
                            f"got {x.dtype}")
        u = batch.draw(lambda n: torch.rand((n, *x.shape[1:]), generator=generator, dtype=torch.float32))
        y = ((x.to(torch.float32) + u.to(x.device)) / self.levels).clamp_(max=_BELOW_ONE)
        return batch.replace(x=y.to(model_dtype(model)))

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        return self.objective.loss(model, self.dequantize(model, batch, generator), generator)

    def evaluate(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        return self.objective.evaluate(model, self.dequantize(model, batch, generator), generator)

    def describe(self) -> dict[str, Any]:
        return {"dequantization": "uniform", **self.objective.describe()}

    def __repr__(self) -> str:
        return f"UniformDequantization(levels={self.levels}, objective={self.objective!r})"


class VariationalDequantization(_Dequantization):
    """The variational-dequantization bound (Flow++): ``objective(y) + log q(u | x)`` with ``u ~ q(u | x)``.

    ``q`` is the model's own dequantizer, ``(y, log_q) = model.dequantizer(x, dtype)``
    (:func:`pushforward.models.dequantized` attaches one), so the same optimizer trains both and DDP
    averages both gradients. One ``u`` per image, drawn under :func:`seeded_rng`. By Jensen,
    ``-log P(x) <= E_q[-log p(y) + log q(u | x)] + D log K``: the bits/dim formula is that of
    :class:`UniformDequantization`, which ``references`` holds to score the same model with uniform noise.

    Args:
        levels: grey levels ``K`` of the data.
        objective: the continuous objective applied to ``y`` (default :class:`NLL`).

    References:
        Ho, Chen, Srinivas, Duan & Abbeel, "Flow++", 2019, section 3.1.
    """

    kind = "variational_dequantization"
    levels: int

    def __init__(self, levels: int, objective: Objective | None = None):
        super().__init__(objective)
        self.levels = _grey_levels("VariationalDequantization", levels)

    def dequantize(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[Batch, Tensor]:
        """Draws ``u ~ q(u | x)``; returns ``(batch, log q(u | x))``.

        The batch has ``x`` replaced by ``y = (x + u) / levels``; ``log q(u | x)`` has shape ``(B,)``.
        """
        if batch.x.is_floating_point():
            raise TypeError(f"variational dequantization needs integer images, got {batch.x.dtype}")
        with seeded_rng(batch, generator):
            y, log_q = cast(Dequantized, model).dequantizer(batch.x, model_dtype(model))
        return batch.replace(x=y), log_q

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        y, log_q = self.dequantize(model, batch, generator)
        return self.objective.loss(model, y, generator) + log_q

    def evaluate(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        y, log_q = self.dequantize(model, batch, generator)
        figures = self.objective.evaluate(model, y, generator)
        return {**figures, "loss": figures["loss"] + log_q, "log_q": log_q}

    def check(self, model: nn.Module) -> None:
        if not isinstance(getattr(model, "dequantizer", None), nn.Module):
            raise TypeError(f"{self!r} needs a model with a dequantizer q(u | x) "
                            f"(pushforward.models.dequantized), got a {type(model).__name__} without one")
        super().check(model)

    def describe(self) -> dict[str, Any]:
        return {"dequantization": "variational", **self.objective.describe()}

    @property
    def references(self) -> dict[str, Objective]:
        return {"uniform": UniformDequantization(self.levels, self.objective)}

    def __repr__(self) -> str:
        return f"VariationalDequantization(levels={self.levels}, objective={self.objective!r})"


class ColumnDequantization(_Dequantization):
    """The bound on a table with (some or all) columns on a grid: ``objective`` on ``y = x + (u - 1/2) h``.

    ``h`` is each column's grid step (``0``: a continuous column, left as it is) and ``u ~ U[0, 1)``
    is drawn afresh for every batch (float32, from ``generator``), so each discrete value is spread
    uniformly over its cell ``[x - h/2, x + h/2)``. The loss is ``objective(y) - sum_j log h_j`` (over
    the grid columns): by Jensen, an upper bound on ``-log P(x_grid) - log p(x_continuous | x_grid)``,
    the same bookkeeping as the images' bits/dim, and bounded below, unlike a continuous density fitted
    to values on a grid.

    Args:
        steps: ``(D,)`` grid steps in the units of the data the model sees (standardised tables:
            ``step / std``); ``0`` for continuous columns.
        objective: the continuous objective applied to ``y`` (default :class:`NLL`).
        columns: the columns' names, for reports.

    References:
        Theis, van den Oord & Bethge, "A note on the evaluation of generative models", 2016.
    """

    kind = "column_dequantization"

    def __init__(self, steps: Any, objective: Objective | None = None, columns: list[str] | None = None):
        super().__init__(objective)
        steps_ = torch.as_tensor(steps, dtype=torch.float64).flatten()
        valid = bool((steps_ >= 0).all()) and bool(torch.isfinite(steps_).all()) and bool((steps_ > 0).any())
        if not valid:
            raise ValueError(f"ColumnDequantization needs finite non-negative grid steps, at least one "
                             f"positive; got {steps_.tolist()}")
        self.steps = steps_
        self.columns = columns or [f"x{j}" for j in range(len(steps_))]
        self.log_volume = float(steps_[steps_ > 0].log().sum())

    @property
    def grid_columns(self) -> list[str]:
        """The names of the dequantized columns."""
        return [c for c, h in zip(self.columns, self.steps.tolist()) if h > 0]

    def dequantize(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
        """The batch with uniform noise of one grid step added to the grid columns, in the model's dtype."""
        x = batch.x
        if x.shape[-1] != len(self.steps):
            raise ValueError(f"{self!r} dequantizes {len(self.steps)} columns, got data of shape "
                             f"{tuple(x.shape)}")
        u = batch.draw(lambda n: torch.rand((n, len(self.steps)), generator=generator, dtype=torch.float32))
        noise = (u - 0.5) * self.steps.to(torch.float32)
        return batch.replace(x=(x.to(torch.float32) + noise.to(x.device)).to(model_dtype(model)))

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        y = self.dequantize(model, batch, generator)
        return self.objective.loss(model, y, generator) - self.log_volume

    def evaluate(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        figures = self.objective.evaluate(model, self.dequantize(model, batch, generator), generator)
        return {**figures, "loss": figures["loss"] - self.log_volume}


    def describe(self) -> dict[str, Any]:
        return {"dequantization": "uniform noise of one grid step on the grid columns",
                "grid_columns": self.grid_columns, "grid_log_volume": self.log_volume,
                **self.objective.describe()}

    def __repr__(self) -> str:
        steps = [float(f"{h:.6g}") for h in self.steps.tolist()]
        return f"ColumnDequantization(steps={steps}, objective={self.objective!r})"


class FlowMatching(Objective):
    """Conditional flow matching on the optimal-transport (straight-line) path: a CNF trained without an ODE.

    For data ``x`` (after the layers before the CNF, see below), noise ``z ~ N(0, I)`` and ``t ~ U[0, 1]``,
    the path ``x_t = (1 - t) x + (sigma_min + (1 - sigma_min) t) z`` runs from the data (``t = 0``) to the
    base (``t = 1``) with velocity ``u = (1 - sigma_min) z - x``; the loss per example is
    ``|v(t, x_t, context) - u|^2`` summed over the event, whose minimiser is the vector field whose flow
    carries the data to the base (Lipman et al. 2023, Theorem 2). Time runs as in
    :class:`~pushforward.transforms.CNF` (data at 0): Lipman et al.'s path with ``t -> 1 - t``.
    ``sigma_min = 0`` is the independent-coupling CFM of Tong et al. (and rectified flow);
    ``coupling = "ot"`` pairs the batch's data and noise by an exact optimal-transport assignment
    (squared distances, ``scipy.optimize.linear_sum_assignment``): Tong et al.'s OT-CFM, straighter
    paths and cheaper solves; unconditional models only, and under ``torchrun`` each process pairs its
    own rows.

    The loss is not a likelihood (``unit``: squared velocity); score the trained model with :class:`NLL`
    (the ODE, :meth:`~pushforward.core.Flow.log_prob`), which ``references`` holds as ``"ode"``.

    The model is a :class:`~pushforward.core.Flow` whose transform is a CNF, or a
    :class:`~pushforward.core.Compose` ending in one: the layers before it (a logit for images) are fixed
    preprocessing, applied without gradient (flow matching gives them none); the base must be
    :class:`~pushforward.distributions.StandardNormal`. The context is embedded by the flow's
    embedding and passed to the vector field.

    Args:
        sigma_min: the width of the path at the data end (Lipman et al.'s ``sigma_min``), in ``[0, 1)``.
        coupling: ``"independent"`` (noise drawn independently of the data) or ``"ot"``.
        dequantization: a :class:`UniformDequantization` or :class:`ColumnDequantization` whose noise is
            added to the data first (discrete images, grid columns of tables); its wrapped objective is
            not used.

    Raises:
        ValueError: ``sigma_min`` outside ``[0, 1)``, an unknown ``coupling``.

    References:
        Lipman, Chen, Ben-Hamu, Nickel & Le, "Flow Matching for Generative Modeling", 2023;
        Tong, Malkin, Huguet, Zhang, Rector-Brooks, Fatras, Wolf & Bengio, "Improving and generalizing
        flow-based generative models with minibatch optimal transport", 2023.
    """

    unit = "squared velocity"
    COUPLINGS = ("independent", "ot")

    def __init__(self, sigma_min: float = 0.0, coupling: str = "independent",
                 dequantization: UniformDequantization | ColumnDequantization | None = None):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"FlowMatching needs 0 <= sigma_min < 1, got {sigma_min}")
        if coupling not in self.COUPLINGS:
            raise ValueError(f"FlowMatching: coupling must be one of {self.COUPLINGS}, got {coupling!r}")
        if dequantization is not None and not isinstance(dequantization,
                                                         (UniformDequantization, ColumnDequantization)):
            raise TypeError("FlowMatching: dequantization must be a UniformDequantization or a "
                            f"ColumnDequantization, got {type(dequantization).__name__}")
        self.sigma_min, self.coupling, self.dequantization = float(sigma_min), coupling, dequantization
        self.name = "flow_matching" if coupling == "independent" else "ot_flow_matching"

    @staticmethod
    def split(model: nn.Module) -> tuple[list[Any], Any]:
        """``(layers before the CNF, the CNF)`` of a flow whose transform is a CNF or a Compose ending in one.

        Raises:
            TypeError: when ``model`` is not such a flow with a standard normal base.
        """
        from .core import Compose, Flow
        from .distributions import StandardNormal
        from .transforms.continuous import CNF

        transform = getattr(model, "transform", None)
        layers = list(transform.transforms) if isinstance(transform, Compose) else [transform]
        if not (isinstance(model, Flow) and layers and isinstance(layers[-1], CNF)):
            raise TypeError("flow matching trains a Flow whose transform is a CNF or a Compose ending in one "
                            f"(pushforward.models.cnf), got a {type(model).__name__}"
                            f"{'' if transform is None else ' with ' + type(transform).__name__}")
        if not isinstance(model.base, StandardNormal):
            raise TypeError(f"flow matching needs a StandardNormal base, got {type(model.base).__name__}")
        return layers[:-1], layers[-1]

    def check(self, model: nn.Module) -> None:
        self.split(model)

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        before, cnf = self.split(model)
        if self.dequantization is not None:
            batch = self.dequantization.dequantize(model, batch, generator)
        x = batch.x
        if not x.is_floating_point():
            raise TypeError(f"flow matching needs continuous data, got {x.dtype}; discrete images are "
                            "trained with FlowMatching(dequantization=UniformDequantization(levels))")
        context = cast(Any, model).embed_context(batch.context)
        with torch.no_grad():
            for layer in before:
                x, _ = layer(x, context)
        shape = x.shape[1:]
        z = batch.draw(lambda n: torch.randn((n, *shape), generator=generator)).to(x.device, x.dtype)
        t = batch.draw(lambda n: torch.rand(n, generator=generator)).to(x.device, x.dtype)
        if self.coupling == "ot":
            if context is not None:
                raise ValueError("FlowMatching(coupling='ot') pairs noise and data across the batch, which "
                                 "ignores the context; use coupling='independent' for a conditional model")
            z = z[_assignment(x, z)]
        tb = t.reshape(-1, *([1] * len(shape)))
        x_t = (1 - tb) * x + (self.sigma_min + (1 - self.sigma_min) * tb) * z
        target = (1 - self.sigma_min) * z - x
        v = cnf.velocity(t, x_t, context)
        return (v - target).square().flatten(1).sum(-1)

    def describe(self) -> dict[str, Any]:
        return {"flow_matching": f"sigma_min={self.sigma_min}, coupling={self.coupling}"}

    @property
    def references(self) -> dict[str, Objective]:
        if isinstance(self.dequantization, UniformDequantization):
            return {"ode": UniformDequantization(self.dequantization.levels)}
        if isinstance(self.dequantization, ColumnDequantization):
            steps, columns = self.dequantization.steps, self.dequantization.columns
            return {"ode": ColumnDequantization(steps, columns=columns)}
        return {"ode": NLL()}

    def __repr__(self) -> str:
        extra = "" if self.dequantization is None else f", dequantization={self.dequantization!r}"
        return f"FlowMatching(sigma_min={self.sigma_min}, coupling={self.coupling!r}{extra})"


def _assignment(x: Tensor, z: Tensor) -> Tensor:
    """The permutation ``p`` minimising ``sum_i |x_i - z_p(i)|^2`` (exact, by linear assignment)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.detach().flatten(1).double(), z.detach().flatten(1).double()).square()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols[rows.argsort()], device=x.device)


#: The training objectives a run can choose by name (``TrainConfig.objective``, ``--objective``).
OBJECTIVES = ("nll", "flow-matching", "ot-flow-matching")


def select_objective(name: str, density: Objective) -> Objective:
    """The training objective called ``name``, given the run's likelihood objective ``density``.

    ``"nll"``: ``density`` itself (the exact NLL, or its dequantization bound for images and grid
    columns). ``"flow-matching"`` / ``"ot-flow-matching"``: :class:`FlowMatching` (independent or OT
    coupling), adding the noise of ``density``'s dequantization first. A flow-matching model is scored
    with ``density`` (the likelihood by the ODE).

    Raises:
        ValueError: an unknown name, or flow matching around a variational dequantizer or an ELBO.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
    if name == "nll":
        return density
    coupling = "ot" if name == "ot-flow-matching" else "independent"
    if isinstance(density, (UniformDequantization, ColumnDequantization)):
        return FlowMatching(coupling=coupling, dequantization=density)
    if type(density) is not NLL:
        raise ValueError(f"flow matching trains a CNF on continuous or uniformly dequantized data, not "
                         f"around {density!r}")
    return FlowMatching(coupling=coupling)


class NoiseAugmentation(Objective):
    """Training on noisy data: ``objective`` at ``y + sigma * eps``, ``eps ~ N(0, I)`` drawn afresh per batch.

    The model then learns the density of the data convolved with ``N(0, sigma^2 I)``, which smooths it
    and, with the denoising step below, gives cleaner samples (TarFlow, section 2.3). :meth:`evaluate`
    scores the **clean** data with ``objective`` (no noise): inside a dequantization bound that is the
    same bits/dim formula as every other model, for the model as trained, so the figures stay comparable
    (and a model trained on noise scores worse on clean data than on noisy data; the training loss
    reported per step is the noisy one). :func:`denoise` undoes the noise of samples in one step along
    the model's own score. Build it around the continuous objective with :func:`with_noise`.

    Args:
        sigma: the noise's standard deviation, in the units the model sees (``[0, 1)`` for dequantized
            images: a flow with a logit first cannot take noisy data outside ``(0, 1)``).
        objective: the continuous objective (default :class:`NLL`).

    Raises:
        ValueError: If ``sigma`` is not positive.

    References:
        Zhai et al., "Normalizing Flows are Capable Generative Models", 2025 (TarFlow), sections 2.3-2.4.
    """

    def __init__(self, sigma: float, objective: Objective | None = None):
        if not sigma > 0:
            raise ValueError(f"NoiseAugmentation needs sigma > 0, got {sigma}")
        self.sigma = float(sigma)
        self.objective = objective if objective is not None else NLL()
        self.name = f"noise_augmented({self.objective.name})"
        self.is_bound = self.objective.is_bound

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        x = batch.x
        eps = batch.draw(lambda n: torch.randn((n, *x.shape[1:]), generator=generator, dtype=torch.float32))
        noisy = batch.replace(x=x + (self.sigma * eps).to(device=x.device, dtype=x.dtype))
        return self.objective.loss(model, noisy, generator)

    def evaluate(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        return self.objective.evaluate(model, batch, generator)

    def check(self, model: nn.Module) -> None:
        self.objective.check(model)

    def describe(self) -> dict[str, Any]:
        return {"noise_augmentation": f"trained on data + N(0, {self.sigma:g}^2) noise; figures are of the "
                                      "clean data", **self.objective.describe()}

    def __repr__(self) -> str:
        return f"NoiseAugmentation(sigma={self.sigma}, objective={self.objective!r})"


def with_noise(objective: Objective, sigma: float) -> Objective:
    """``objective`` with :class:`NoiseAugmentation` around its continuous part (``sigma = 0``: unchanged).

    ``NLL`` becomes ``NoiseAugmentation(sigma, NLL())``; a uniform or variational dequantization bound
    keeps its dequantization and adds the noise to the dequantized data.

    Raises:
        ValueError: For another objective (an ELBO, flow matching, tables' column dequantization).
    """
    if sigma == 0:
        return objective
    if isinstance(objective, (UniformDequantization, VariationalDequantization)):
        return type(objective)(objective.levels, with_noise(objective.objective, sigma))
    if type(objective) is NLL:
        return NoiseAugmentation(sigma, objective)
    raise ValueError(f"noise augmentation is for likelihood training of flows (NLL, dequantization bounds); "
                     f"got {objective!r}")


def denoise(model: nn.Module, x: Tensor, sigma: float, context: Tensor | None = None) -> Tensor:
    """One step along the model's own score: ``x + sigma^2 grad_x log p(x | context)`` (Tweedie's formula).

    For a model of data with ``N(0, sigma^2 I)`` noise added (:class:`NoiseAugmentation`) this is the
    posterior mean of the clean data given a noisy sample ``x``: how TarFlow denoises its samples. Costs
    one ``log_prob`` with its gradient; runs with gradients enabled whatever the caller's mode.

    Args:
        model: a model with ``log_prob(x, context)``.
        x: samples ``(B, *event_shape)``.
        sigma: the training noise's standard deviation.
        context: optional context ``(B, context_features)``.

    Returns:
        The denoised samples, of ``x``'s shape, detached.

    References:
        Efron, "Tweedie's formula and selection bias", 2011; Zhai et al., 2025 (TarFlow), section 2.4.
    """
    with torch.enable_grad():
        y = x.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(cast(LogDensity, model).log_prob(y, context).sum(), y)
    return (x + sigma**2 * score).detach()


def default_objective(model: nn.Module, data: Any, dequantization: str | None = None) -> Objective:
    """The objective a model is trained and scored with by default: the one place that chooses it.

    - the density part: :class:`ELBO` with the VAE's own ``k`` for a :class:`~pushforward.vae.VAE`,
      else the exact :class:`NLL`;
    - discrete images (:class:`~pushforward.data.ImageData`) wrap it in a dequantization bound:
      :class:`VariationalDequantization` with ``dequantization = "variational"``, else
      :class:`UniformDequantization`; continuous data (a float tensor) take it as it is.

    Args:
        model: the model to train or score.
        data: its training (or test) data: a float tensor or an ``ImageData``.
        dequantization: ``"uniform"`` or ``"variational"`` (``TrainConfig.dequantization``);
            ``None``: variational when ``model`` carries a dequantizer and the data are images.

    Raises:
        ValueError: ``"variational"`` without image data or without a dequantizer on the model,
            ``"uniform"`` for a model that carries one, or an unknown ``dequantization``.
    """
    from .data.images import ImageData
    from .dequantization import VariationalDequantizer
    from .vae import VAE

    density: Objective = ELBO(model.k) if isinstance(model, VAE) else NLL()
    levels = int(data.levels) if isinstance(data, ImageData) else None
    carries = isinstance(getattr(model, "dequantizer", None), VariationalDequantizer)
    if dequantization is None:
        dequantization = "variational" if carries and levels is not None else "uniform"
    if dequantization == "variational":
        if levels is None or not carries:
            raise ValueError("dequantization = 'variational' needs image data and a flow with a dequantizer "
                             "(pushforward.models.dequantized; pushforward.experiment.build_flow builds it "
                             "from the config)")
        return VariationalDequantization(levels, density)
    if dequantization != "uniform":
        raise ValueError(f"dequantization must be 'uniform' or 'variational', got {dequantization!r}")
    if carries:
        raise ValueError("this flow carries a variational dequantizer: train it with "
                         "dequantization = 'variational'")
    return density if levels is None else UniformDequantization(levels, density)
