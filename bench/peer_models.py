"""The same flow built with pushforward and with each peer library (nflows, zuko, normflows, FrEIA).

Every builder returns a :class:`Built`: the module to optimise, ``log_prob(x)``, ``sample(n)`` and the
differences from the pushforward model that the library cannot avoid (``notes``). A library that
cannot build a task raises :class:`Unsupported` with the reason; a library that is not installed
raises :class:`Missing`.

Tasks (:class:`TaskSpec`):

* ``vector``: ``layers`` affine (or rational-quadratic spline) couplings on ``features``-D data,
  the two halves alternating as the conditioning part, MLP conditioners ``D/2 -> hidden -> out``
  with ReLU and a zero-initialised last layer, standard normal base.
* ``image``: Glow-style multi-scale model on ``(C, H, W)``: per level, squeeze then ``steps`` x
  (ActNorm, invertible 1x1 convolution, affine coupling on channel halves), factor out half the
  channels between levels; conditioner ``conv3x3(C/2 -> h) ReLU conv1x1(h -> h) ReLU conv3x3(h -> C)``
  with a zero-initialised last convolution.

Each library uses its own building blocks and its own conditioner class where it ships one
(zuko ``MLP``, normflows ``MLP`` / ``ConvNet2d``, nflows ``nn.nets.MLP``); where the library expects
user code (FrEIA subnets, nflows convolutional conditioner) a plain ``nn.Sequential`` is passed.
The affine kernel keeps each library's own parameterisation of the scale (listed in ``notes``):
the elementwise cost differs by a few operations, the networks not at all.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pushforward import models

LIBRARIES = ("pushforward", "nflows", "zuko", "normflows", "FrEIA")
PEERS = LIBRARIES[1:]
_MODULE = {"pushforward": "pushforward", "nflows": "nflows", "zuko": "zuko", "normflows": "normflows",
           "FrEIA": "FrEIA"}
_LOG_2PI = math.log(2 * math.pi)


class Unsupported(Exception):
    """The library cannot build this model (the message says why)."""


class Missing(Exception):
    """The library is not installed."""


def available(lib: str) -> bool:
    """Whether ``lib`` is importable; ``BENCH_HIDE_PEERS=nflows,zuko`` (or ``all``) hides peers, to test
    the path where they are missing."""
    hidden = {s.strip() for s in os.environ.get("BENCH_HIDE_PEERS", "").split(",") if s.strip()}
    if lib != "pushforward" and (lib in hidden or "all" in hidden):
        return False
    return importlib.util.find_spec(_MODULE[lib]) is not None


def version(lib: str) -> str:
    if not available(lib):
        return "not installed (or hidden by BENCH_HIDE_PEERS)" if lib != "pushforward" else "not installed"
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(lib)
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark model.

    ``kind`` is ``"vector"`` or ``"image"``; ``kernel`` ``"affine"`` or ``"spline"``.
    """

    name: str
    kind: str
    batch: int
    features: int = 0
    layers: int = 8
    hidden: tuple[int, ...] = (128, 128)
    mask: str = "half"  # pushforward's mask name; both split the features into halves that alternate
    kernel: str = "affine"
    bins: int = 8
    bound: float = 5.0  # spline interval [-bound, bound] (linear tails outside)
    shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 2
    steps: int = 4
    hidden_channels: int = 64
    round_s: float = 0.4  # seconds per candidate per interleaved round

    @property
    def dims(self) -> int:
        return self.features if self.kind == "vector" else math.prod(self.shape)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.features,) if self.kind == "vector" else tuple(self.shape)

    def describe(self) -> str:
        if self.kind == "vector":
            h = " -> ".join(map(str, self.hidden))
            d_in = self.features - self.features // 2
            out = (self.features // 2) * (2 if self.kernel == "affine" else 3 * self.bins - 1)
            k = ("affine" if self.kernel == "affine"
                 else f"RQ-spline ({self.bins} bins, [-{self.bound:g}, {self.bound:g}])")
            return (f"{self.features}-D, {self.layers} {k} couplings, MLP {d_in} -> {h} -> {out}, "
                    f"batch {self.batch}")
        c, hh, w = self.shape
        return (f"{c}x{hh}x{w}, {self.levels} levels x (squeeze, {self.steps} x (ActNorm, 1x1 conv, "
                f"affine coupling)), conv conditioner width {self.hidden_channels}, batch {self.batch}")

    def data(self, n: int, seed: int = 0) -> Tensor:
        """Synthetic inputs for the speed half (values as after centring: timing does not depend on them)."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "vector" and self.features == 2:
            return torch.randn(n, 2, generator=g)
        return torch.rand(n, *self.event_shape, generator=g) - 0.5


def task_specs(quick: bool) -> dict[str, TaskSpec]:
    if quick:
        return {
            "T2": TaskSpec("T2", "vector", 64, features=2, layers=2, hidden=(16, 16), mask="alternating",
                           round_s=0.01),
            "T64": TaskSpec("T64", "vector", 32, features=8, layers=2, hidden=(32, 32), round_s=0.01),
            "TIMG": TaskSpec("TIMG", "image", 8, shape=(1, 8, 8), steps=1, hidden_channels=8, round_s=0.01),
            "SPLINE": TaskSpec("SPLINE", "vector", 32, features=8, layers=2, hidden=(32, 32), kernel="spline",
                               bins=4, round_s=0.01),
        }
    return {
        "T2": TaskSpec("T2", "vector", 512, features=2, layers=8, hidden=(128, 128), mask="alternating",
                       round_s=0.4),
        "T64": TaskSpec("T64", "vector", 256, features=64, layers=8, hidden=(512, 512), round_s=0.5),
        "TIMG": TaskSpec("TIMG", "image", 64, shape=(1, 28, 28), levels=2, steps=4, hidden_channels=64,
                         round_s=0.8),
        "SPLINE": TaskSpec("SPLINE", "vector", 256, features=64, layers=8, hidden=(512, 512), kernel="spline",
                           bins=8, round_s=0.6),
    }


@dataclass
class Built:
    """A model of one library: what to optimise, how to evaluate and sample, and how it differs."""

    library: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]
    notes: list[str] = field(default_factory=list)
    flow: nn.Module | None = None  # pushforward only: the Flow (to compile its methods)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


def _zero_last(net: nn.Module) -> nn.Module:
    last = [m for m in net.modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2][-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)
    return net


def _plain_mlp(d_in: int, d_out: int, hidden: tuple[int, ...]) -> nn.Sequential:
    sizes = [d_in, *hidden]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], d_out))
    return _zero_last(nn.Sequential(*layers))


def _plain_convnet(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    return _zero_last(nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        nn.Conv2d(hidden, c_out, 3, padding=1),
    ))


class _NoContext(nn.Module):
    """nflows calls ``net(x, context)``; its ``MLP`` and plain modules take one argument."""

    def __init__(self, net: nn.Module, hidden_features: int | None = None):
        super().__init__()
        self.net = net
        if hidden_features is not None:  # nflows' spline couplings scale bin logits by 1/sqrt(this)
            self.hidden_features = hidden_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


def _halves(spec: TaskSpec, i: int) -> tuple[list[int], list[int]]:
    """(conditioning, transformed) feature indices of coupling ``i``.

    As pushforward's HalfMask / AlternatingMask split them.
    """
    d = spec.features
    if spec.mask == "alternating":
        cond = list(range(i % 2, d, 2))
    else:
        half = d - d // 2
        cond = list(range(half, d)) if i % 2 else list(range(half))
    return cond, [j for j in range(d) if j not in cond]


def _params_per_feature(spec: TaskSpec) -> int:
    return 2 if spec.kernel == "affine" else 3 * spec.bins - 1


def _std_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.flatten(1).square().sum(1) - 0.5 * z[0].numel() * _LOG_2PI


# ------------------------------------------------------------------------------------------------
# The limit: the conditioner networks alone
# ------------------------------------------------------------------------------------------------
def limit_networks(spec: TaskSpec) -> tuple[nn.ModuleList, list[tuple[int, ...]]]:
    """Plain ``nn.Sequential`` conditioners of the task's sizes; the input shape each sees (batch first)."""
    b = spec.batch
    nets, shapes = [], []
    if spec.kind == "vector":
        for i in range(spec.layers):
            cond, trans = _halves(spec, i)
            nets.append(_plain_mlp(len(cond), len(trans) * _params_per_feature(spec), spec.hidden))
            shapes.append((b, len(cond)))
    else:
        c, h, w = spec.shape
        for _level in range(spec.levels):
            c, h, w = 4 * c, h // 2, w // 2
            for _ in range(spec.steps):
                nets.append(_plain_convnet(c - c // 2, 2 * (c // 2), spec.hidden_channels))
                shapes.append((b, c - c // 2, h, w))
            c = c - c // 2
    return nn.ModuleList(nets), shapes


# ------------------------------------------------------------------------------------------------
# pushforward
# ------------------------------------------------------------------------------------------------
def build_pushforward(spec: TaskSpec) -> Built:
    if spec.kind == "image":
        flow = models.glow(spec.shape, levels=spec.levels, steps=spec.steps,
                           hidden_channels=spec.hidden_channels, split_prior=False, alpha=None)
        notes = ["scale exp(3 tanh(a/3))",
                 "conditioners run in channels-last layout (pushforward.nn.ConvNet)"]
    elif spec.kernel == "spline":
        flow = models.nsf(spec.features, layers=spec.layers, hidden=spec.hidden, bins=spec.bins,
                          tail_bound=spec.bound, mask=spec.mask)
        notes = []
    else:
        flow = models.realnvp(spec.features, layers=spec.layers, hidden=spec.hidden, mask=spec.mask)
        notes = ["scale exp(3 tanh(a/3))"]
    return Built("pushforward", flow, flow.log_prob, flow.sample, notes, flow=flow)


# ------------------------------------------------------------------------------------------------
# nflows
# ------------------------------------------------------------------------------------------------
def build_nflows(spec: TaskSpec) -> Built:
    if not available("nflows"):
        raise Missing("nflows")
    from nflows import distributions as nd
    from nflows import flows as nfl
    from nflows import transforms as nt
    from nflows.nn.nets import MLP as NflowsMLP

    notes = []
    if spec.kind == "vector":
        def net(d_in, d_out):
            mlp = NflowsMLP((d_in,), (d_out,), hidden_sizes=list(spec.hidden))
            return _NoContext(_zero_last(mlp), spec.hidden[-1])

        layers = []
        for i in range(spec.layers):
            _cond, trans = _halves(spec, i)
            mask = torch.full((spec.features,), -1)
            mask[trans] = 1  # > 0: transformed
            if spec.kernel == "affine":
                layers.append(nt.AffineCouplingTransform(mask, net))
            else:
                layers.append(nt.PiecewiseRationalQuadraticCouplingTransform(
                    mask, net, num_bins=spec.bins, tails="linear", tail_bound=spec.bound))
        if spec.kernel == "affine":
            notes.append("scale sigmoid(a+2)+1e-3 (so <= 1.001 towards the latent)")
        flow = nfl.Flow(nt.CompositeTransform(layers), nd.StandardNormal([spec.features]))
        return Built("nflows", flow, flow.log_prob, flow.sample, notes)

    c, h, w = spec.shape
    ms = nt.MultiscaleCompositeTransform(spec.levels, split_dim=1)
    shape = (c, h, w)
    for _level in range(spec.levels):
        c, h, w = 4 * shape[0], shape[1] // 2, shape[2] // 2
        ts = [nt.SqueezeTransform(factor=2)]
        for _ in range(spec.steps):
            mask = torch.full((c,), -1)
            mask[c - c // 2:] = 1
            ts += [nt.ActNorm(c), nt.OneByOneConvolution(c),
                   nt.AffineCouplingTransform(
                       mask, lambda a, b: _NoContext(_plain_convnet(a, b, spec.hidden_channels)))]
        shape = ms.add_transform(nt.CompositeTransform(ts), (c, h, w))
    notes += ["scale sigmoid(a+2)+1e-3", "1x1 conv: LU + bias + random permutation",
              "factors out the first channel half (the others keep it)", "user-written conv conditioner"]
    flow = nfl.Flow(ms, nd.StandardNormal([spec.dims]))
    return Built("nflows", flow, flow.log_prob, flow.sample, notes)


# ------------------------------------------------------------------------------------------------
# zuko
# ------------------------------------------------------------------------------------------------
def build_zuko(spec: TaskSpec) -> Built:
    if not available("zuko"):
        raise Missing("zuko")
    if spec.kind == "image":
        raise Unsupported("zuko 1.6 has no image (convolutional / multi-scale) flows")
    import zuko
    from zuko.flows import GeneralCouplingTransform
    from zuko.transforms import MonotonicRQSTransform

    layers = []
    for i in range(spec.layers):
        cond, _trans = _halves(spec, i)
        mask = torch.zeros(spec.features, dtype=torch.bool)
        mask[cond] = True  # True: conditioning
        if spec.kernel == "affine":
            t = GeneralCouplingTransform(spec.features, mask=mask, hidden_features=spec.hidden)
        else:
            t = GeneralCouplingTransform(
                spec.features, mask=mask, hidden_features=spec.hidden,
                univariate=lambda *p: MonotonicRQSTransform(*p, bound=spec.bound),
                shapes=[(spec.bins,), (spec.bins,), (spec.bins - 1,)])
        _zero_last(t.hyper)
        layers.append(t)
    base = zuko.lazy.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(spec.features), torch.ones(spec.features), buffer=True)
    flow = zuko.flows.Flow(layers, base)
    notes = ["builds torch.distributions Transform objects on every call",
             "imports patch torch.distributions globally (validate_args off)"]
    if spec.kernel == "affine":
        notes.insert(0, "scale exp(a/(1+|a|/6.9))")
    else:
        notes.insert(0, "spline: min bin size / slope by soft clipping, not by floors")

    def log_prob(x):
        return flow().log_prob(x)

    def sample(n):
        return flow().sample((n,))

    return Built("zuko", flow, log_prob, sample, notes)


# ------------------------------------------------------------------------------------------------
# normflows
# ------------------------------------------------------------------------------------------------
def build_normflows(spec: TaskSpec) -> Built:
    if not available("normflows"):
        raise Missing("normflows")
    import normflows as nf

    notes = []
    if spec.kind == "vector":
        d = spec.features
        flows: list[nn.Module] = []
        if spec.kernel == "affine":
            # AffineCouplingBlock conditions on the first half; a swap between layers alternates the halves
            for i in range(spec.layers):
                if i:
                    flows.append(nf.flows.Permute(d, mode="swap"))
                net = nf.nets.MLP([d - d // 2, *spec.hidden, 2 * (d // 2)], init_zeros=True)
                flows.append(nf.flows.AffineCouplingBlock(net, scale=True, scale_map="exp",
                                                          split_mode="channel"))
            flows.reverse()  # normflows lists flows in the sampling direction (latent -> data)
            notes += ["scale exp(a) (unbounded)", f"{spec.layers - 1} swap permutations between couplings"]
        else:
            from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling

            class Spline(nf.flows.Flow):
                """normflows' wrapper (as CoupledRationalQuadraticSpline) with an MLP conditioner."""

                def __init__(self, mask):
                    super().__init__()
                    self.prqct = PiecewiseRationalQuadraticCoupling(
                        mask=mask, transform_net_create_fn=lambda a, b: _NoContext(
                            nf.nets.MLP([a, *spec.hidden, b], init_zeros=True), spec.hidden[-1]),
                        num_bins=spec.bins, tails="linear", tail_bound=spec.bound)

                def forward(self, z, context=None):
                    z, log_det = self.prqct.inverse(z, context)
                    return z, log_det.view(-1)

                def inverse(self, z, context=None):
                    z, log_det = self.prqct(z, context)
                    return z, log_det.view(-1)

            for i in range(spec.layers):
                _, trans = _halves(spec, i)
                mask = torch.zeros(d)
                mask[trans] = 1
                flows.append(Spline(mask))
            flows.reverse()
            notes.append("spline: nflows' code, vendored")
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), flows)

        def sample(n):
            return model.sample(n)[0]

        notes.append("sample() also computes log q")
        return Built("normflows", model, model.log_prob, sample, notes)

    c, h, w = spec.shape
    q0, levels, merges = [], [], []
    for level in range(spec.levels):  # normflows lists levels deepest first
        k = spec.levels - level  # squeezes up to and including this level
        ch = c * 4 ** k // 2 ** (k - 1)  # channels inside this level
        blocks = [nf.flows.GlowBlock(ch, spec.hidden_channels, scale=True, split_mode="channel", leaky=0.0)
                  for _ in range(spec.steps)]
        levels.append(blocks + [nf.flows.Squeeze()])
        if level == 0:
            latent = (ch, h // 2 ** k, w // 2 ** k)
        else:
            latent = (ch // 2, h // 2 ** k, w // 2 ** k)
            merges.append(nf.flows.Merge())
        q0.append(nf.distributions.DiagGaussian(latent, trainable=False))
    model = nf.MultiscaleFlow(q0, levels, merges, class_cond=False)
    notes += ["scale 1/sigmoid(a+2) towards the latent", "one base per level",
              "sample() also computes log q"]

    def sample(n):
        return model.sample(n)[0]

    return Built("normflows", model, lambda x: model.log_prob(x, None), sample, notes)


# ------------------------------------------------------------------------------------------------
# FrEIA
# ------------------------------------------------------------------------------------------------
def _freia_tanh3(u: Tensor) -> Tensor:
    return torch.tanh(u / 3.0)


def build_freia(spec: TaskSpec) -> Built:
    if not available("FrEIA"):
        raise Missing("FrEIA")
    if spec.kernel == "spline":
        raise Unsupported("FrEIA 0.2 has no spline couplings")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    notes = []
    if spec.kind == "vector":
        if spec.layers % 2:
            raise Unsupported("FrEIA's GLOWCouplingBlock holds two couplings; an odd layer count cannot be "
                              "built")
        inn = Ff.SequenceINN(spec.features)
        for _ in range(spec.layers // 2):  # each block: both halves, one after the other
            inn.append(Fm.GLOWCouplingBlock, subnet_constructor=lambda a, b: _plain_mlp(a, b, spec.hidden),
                       clamp=3.0, clamp_activation=_freia_tanh3)
        notes += [f"{spec.layers // 2} GLOWCouplingBlocks (2 couplings each)",
                  "scale exp(3 tanh(a/3)) (same as pushforward)",
                  "user-written MLP subnet", "no base distribution: log-density written by the user"]

        def log_prob(x):
            z, ladj = inn(x)
            return _std_normal_log_prob(z) + ladj

        def sample(n):
            z = torch.randn(n, spec.features)
            return inn(z, rev=True)[0]

        return Built("FrEIA", inn, log_prob, sample, notes)

    c, h, w = spec.shape
    g = torch.Generator().manual_seed(0)
    nodes: list = [Ff.InputNode(c, h, w, name="x")]
    prev = nodes[0]  # the node (or (node, output index)) the next module reads
    outs = []

    def conv_subnet(a, b):
        return _plain_convnet(a, b, spec.hidden_channels)

    for level in range(spec.levels):
        nodes.append(Ff.Node(prev, Fm.IRevNetDownsampling, {}))
        c = 4 * c
        for _ in range(spec.steps):
            m = torch.linalg.qr(torch.randn(c, c, generator=g))[0]
            nodes.append(Ff.Node(nodes[-1], Fm.ActNorm, {}))
            nodes.append(Ff.Node(nodes[-1], Fm.Fixed1x1Conv, {"M": m}))
            nodes.append(Ff.Node(nodes[-1], Fm.AffineCouplingOneSided,
                                 {"subnet_constructor": conv_subnet, "clamp": 3.0,
                                  "clamp_activation": _freia_tanh3}))
        prev = nodes[-1]
        if level < spec.levels - 1:
            split = Ff.Node(prev, Fm.Split, {"section_sizes": [c - c // 2, c // 2], "dim": 0})
            nodes.append(split)
            outs.append(Ff.OutputNode(split.out1))
            prev = split.out0
            c = c - c // 2
    outs.append(Ff.OutputNode(prev))
    inn = Ff.GraphINN(nodes + outs)
    shapes = [tuple(s) for s in inn.global_out_shapes]
    notes += ["1x1 conv FIXED (random orthogonal; FrEIA 0.2 has no learned one)",
              "scale exp(3 tanh(a/3))", "user-written conv subnet",
              "graph API: split / outputs wired by hand"]

    def log_prob(x):
        zs, ladj = inn(x)
        return sum(_std_normal_log_prob(z) for z in zs) + ladj

    def sample(n):
        zs = [torch.randn(n, *s) for s in shapes]
        return inn(zs, rev=True)[0]

    return Built("FrEIA", inn, log_prob, sample, notes)


BUILDERS: dict[str, Callable[[TaskSpec], Built]] = {
    "pushforward": build_pushforward,
    "nflows": build_nflows,
    "zuko": build_zuko,
    "normflows": build_normflows,
    "FrEIA": build_freia,
}


def build(lib: str, spec: TaskSpec, seed: int = 0) -> Built:
    torch.manual_seed(seed)
    return BUILDERS[lib](spec)
