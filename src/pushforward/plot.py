"""Figures: density heat maps, sample scatter plots, image grids and training curves.

A density enters as a callable ``log_prob(points) -> log densities`` (``(N, 2) -> (N,)``): a flow's
``flow.log_prob``, a VAE's importance-weighted estimate ``partial(vae.iwae, k=100)``, or a known true
density alike.

Matplotlib is imported lazily and only through its object-oriented API with the Agg canvas, so
importing this module is cheap and plotting never touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

#: A log density on 2-D points: ``(N, 2) -> (N,)``.
LogDensity = Callable[[Tensor], Tensor]

__all__ = ["LogDensity", "data_bounds", "density_grid", "image_grid", "plot_2d", "plot_curves",
           "save_image_grid"]


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def data_bounds(x: Tensor, margin: float = 0.1) -> tuple[float, float, float, float]:
    """A box ``(xmin, xmax, ymin, ymax)`` holding the 0.5%..99.5% quantiles of ``x`` plus a margin."""
    x = x.detach().double().cpu()
    lo = torch.quantile(x, 0.005, dim=0)
    hi = torch.quantile(x, 0.995, dim=0)
    pad = (hi - lo) * margin
    lo, hi = lo - pad, hi + pad
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


@torch.no_grad()
def density_grid(log_prob: LogDensity, bounds: Sequence[float], resolution: int = 200, batch_size: int = 8192,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """``log_prob`` on a ``resolution x resolution`` grid over ``bounds = (xmin, xmax, ymin, ymax)``.

    The grid points are made in ``dtype`` on ``device`` (those the model expects), in batches of
    ``batch_size``; a model should be in evaluation mode. Returns ``(xs, ys, logp[y, x])``, ``logp``
    on the CPU.
    """
    x0, x1, y0, y1 = bounds
    xs = torch.linspace(x0, x1, resolution, dtype=dtype)
    ys = torch.linspace(y0, y1, resolution, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)
    logp = torch.cat([log_prob(points[i : i + batch_size].to(device)).cpu()
                      for i in range(0, len(points), batch_size)])
    return xs, ys, logp.reshape(resolution, resolution)


def plot_2d(path: str | os.PathLike, samples: Tensor, log_prob: LogDensity | None = None,
            data: Tensor | None = None, bounds: Sequence[float] | None = None, title: str = "",
            dtype: torch.dtype = torch.float32) -> Path:
    """One PNG with panels: the data (if given), the samples, and the density heat map of ``log_prob``
    (if given; evaluated on points of ``dtype``, see :func:`density_grid`)."""
    samples = samples.detach().cpu()
    ref = data if data is not None else samples
    bounds = tuple(bounds) if bounds is not None else data_bounds(ref.detach().cpu())
    panels = [("data", data.detach().cpu())] if data is not None else []
    panels.append(("flow samples", samples))
    ncol = len(panels) + (log_prob is not None)
    aspect = (bounds[3] - bounds[2]) / max(1e-12, bounds[1] - bounds[0])
    fig = _figure(4 * ncol + (0.8 if log_prob is not None else 0), 4 * min(1.5, max(0.4, aspect)) + 0.9)
    axes = fig.subplots(1, ncol, squeeze=False)[0]
    for ax, (name, pts) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, linewidths=0, color="C0" if name == "data" else "C1")
        ax.set_title(f"{name} (n={len(pts)})")
    if log_prob is not None:
        _, _, logp = density_grid(log_prob, bounds, dtype=dtype)
        ax = axes[-1]
        im = ax.imshow(logp.exp().numpy(), origin="lower", extent=bounds, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, shrink=0.8, label="p(x)")
        ax.set_title("flow density")
    for ax in axes:
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """Tiles images ``(N, C, H, W)`` with values in ``[0, 1]`` into one ``(H', W', C)`` array."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_ = math.ceil(n / nrow)
    grid = torch.ones(c, ncol_ * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid.permute(1, 2, 0)


def save_image_grid(path: str | os.PathLike, images: Tensor, nrow: int | None = None, title: str = "",
                    scale: float = 0.06) -> Path:
    """Writes an image grid (values in ``[0, 1]``) as a PNG, grey-scale for one channel."""
    grid = image_grid(images, nrow)
    h, w = grid.shape[:2]
    size = max(3.0, min(12.0, max(h, w) * scale))
    fig = _figure(size * w / max(h, w), size * h / max(h, w) + (0.4 if title else 0))
    ax = fig.add_subplot()
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_curves(path: str | os.PathLike, rows: list[dict], title: str = "") -> Path:
    """Training and validation NLL (or bits/dim when present) against the optimizer step."""
    if not rows:
        raise ValueError("no metrics rows to plot (has the run validated at least once?)")
    unit = "bpd" if any("val_bpd" in r for r in rows) else "nll"
    label = "bits/dim" if unit == "bpd" else "NLL (nats)"
    steps = [r["step"] for r in rows]
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    for key, name, style in ((f"train_{unit}", "train", "-"), (f"val_{unit}", "validation", "-o")):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(steps, vals, style, label=name, markersize=3)
    best = [r for r in rows if r.get("best")]
    if best:
        b = min(best, key=lambda r: r["val_nll"])
        ax.axvline(b["step"], color="grey", linestyle=":", label=f"best val {b[f'val_{unit}']:.4f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"training curves ({label})")
    return _save(fig, path)
