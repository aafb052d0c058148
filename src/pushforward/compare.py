"""``pushforward compare``: the lecture's flows-versus-VAEs comparison, as a command.

Trains (or reopens) a flow and a VAE on the same data split, then scores both on the same test
examples with the same dequantization noise:

* the flow's exact negative log-likelihood ``-log p(y)``;
* the VAE's negative ELBO, split into reconstruction and KL terms;
* the VAE's importance-weighted estimates ``-IWAE_k`` for ``k = 1, 10, 100, 1000``, which are
  upper bounds on its NLL (in expectation) that tighten as ``k`` grows;
* the gaps, per example and paired (so their standard errors are small), training time, sampling
  speed, and figures: samples of both side by side, and the bound tightening with ``k``.

Images are in nats of the dequantized ``y`` in ``[0, 1]`` and bits/dim of the discrete images
(:func:`pushforward.metrics.bits_per_dim`), for both models alike.

The two models are matched either in parameter count (``--match params``, the default: the VAE's
width is chosen to match the flow's parameter count, and both train for the same number of steps)
or in wall-clock time (``--match time``: each model, at its default size, gets ``--minutes`` of
training with a step count timed to fit).

Output in the run directory: ``report.md``, ``compare.json``, ``samples.png``, ``bound.png``,
and the two training runs in ``flow/`` and ``vae/`` (usable with ``pushforward eval/sample/plot``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import checkpoint_dir
from .config import TrainConfig, dataset_entry, merge, parse_overrides, resolve_config
from .data import Dataset, dequantize
from .experiment import build_flow, load_dataset, open_run, quantize, test_budget
from .io import atomic_write
from .metrics import bits_per_dim, mean_and_stderr
from .models import build
from .plot import data_bounds, density_grid, image_grid
from .runs import calibrate_steps, say, train_run
from .train import _progress, seed_from
from .vae import VAE

__all__ = ["DEFAULT_KS", "compare", "count_parameters", "match_vae_width", "sampling_speed", "score"]

#: The IWAE sample counts ``k`` scored by default.
DEFAULT_KS = (1, 10, 100, 1000)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of scalar parameters of ``model`` (every tensor of ``model.parameters()``)."""
    return sum(p.numel() for p in model.parameters())


def _vae_parameters(kwargs: dict) -> int:
    with torch.device("meta"):  # counts without allocating
        return count_parameters(build({"recipe": "vae", "kwargs": kwargs}))


def match_vae_width(target: int, event_shape: Sequence[int], model: dict | None = None,
                    min_channels: int = 16) -> tuple[dict, int]:
    """VAE recipe kwargs (``model`` with its width set) whose parameter count is closest to ``target``.

    The width is ``hidden = [w, w]`` (MLP; the depth of ``model["hidden"]`` is kept) or
    ``hidden_channels = w`` (convolutional). For images, when even ``min_channels`` channels
    would exceed ``target``, the linear ``bottleneck`` is halved first (down to 1 channel), so the
    convolutions keep a useful width. Returns ``(kwargs, parameters)``.
    """
    kwargs = {**(model or {}), "event_shape": list(event_shape)}
    conv = len(event_shape) == 3 and kwargs.get("arch", "auto") in ("auto", "conv")
    depth = len(kwargs.get("hidden", (256, 256)))

    def with_width(w: int) -> dict:
        if conv:
            return {**kwargs, "hidden_channels": w}
        return {**kwargs, "hidden": [w] * depth}

    if conv:
        kwargs.setdefault("bottleneck", 4)
        while kwargs["bottleneck"] > 1 and _vae_parameters(with_width(min_channels)) > target:
            kwargs["bottleneck"] //= 2
    lo, hi = 1, 2
    while _vae_parameters(with_width(hi)) < target and hi < 1 << 14:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # smallest width whose count reaches the target lies in (lo, hi]
        mid = (lo + hi) // 2
        if _vae_parameters(with_width(mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda w: abs(_vae_parameters(with_width(w)) - target))
    out = with_width(best)
    out.pop("event_shape")
    return out, _vae_parameters(with_width(best))


@torch.no_grad()
def sampling_speed(model, n: int, repeats: int = 3) -> float:
    """Samples per second of ``model.sample(n)`` (median of ``repeats`` timed calls, after one warm-up)."""
    model.eval()
    model.sample(min(n, 16))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.sample(n)
        times.append(time.perf_counter() - t0)
    return n / sorted(times)[len(times) // 2]


def _mean_se(values: Tensor) -> tuple[float, float]:
    mean, se = mean_and_stderr(values)
    return float(mean), float(se)


# -- training ---------------------------------------------------------------------------------------
def _config(data: str, run_dir: Path, seed: int, sets: list[str], extra: dict) -> TrainConfig:
    values = merge(parse_overrides(sets), {"data": data, "run_dir": str(run_dir), "seed": seed, **extra})
    return resolve_config({}, values)


def _metrics_summary(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"steps": rows[-1]["step"], "train_seconds": rows[-1].get("elapsed_s")} if rows else {}


def _train(config: TrainConfig, what: str, overwrite: bool) -> dict:
    run_dir = Path(config.run_dir)
    trained = (checkpoint_dir(run_dir) / "state.json").exists() or (run_dir / "best.safetensors").exists()
    if trained and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a {what} run; pass --overwrite to retrain it, or reuse it with "
            f"--{what} {run_dir}"
        )
    t0 = time.monotonic()
    history, _, _ = train_run(config, overwrite=True)
    seconds = time.monotonic() - t0
    return {"steps": history.step, "train_seconds": round(seconds, 2), "stop_reason": history.stop_reason}


def _open(path: str | Path, what: str) -> tuple[Any, TrainConfig, dict]:
    run = open_run(path)
    is_vae = (run.flow.recipe or {}).get("recipe") == "vae"
    if is_vae != (what == "vae"):
        raise ValueError(f"--{what} {path} holds a {'VAE' if is_vae else 'flow'}, not a {what}")
    return run.flow, run.config, _metrics_summary(run.run_dir)


def _matched(match: str, reused: list[str], width_matched: bool, minutes: float, flow_params: int,
             vae_params: int, flow_stats: dict, vae_stats: dict) -> str:
    """What the comparison matched, checked against what happened, and only that: a parameter count the
    VAE's width was chosen for (and reached within 10%), a training budget both runs got here (and
    used: the same steps, or both stopped by the clock), or the words saying that nothing was."""
    matched, unmatched = [], []
    params = f"{flow_params:,} vs {vae_params:,} parameters"
    if width_matched and abs(vae_params - flow_params) <= 0.1 * flow_params:
        matched.append(f"parameter counts ({params}: the VAE's width was chosen for the flow's)")
    else:
        unmatched.append(params)
    fs, vs = flow_stats.get("steps"), vae_stats.get("steps")
    steps = f"{fs if fs is not None else '?'} vs {vs if vs is not None else '?'} training steps"
    ft, vt = flow_stats.get("train_seconds"), vae_stats.get("train_seconds")
    close = ft is not None and vt is not None and abs(ft - vt) <= 0.25 * max(ft, vt, 1e-9)
    if len(reused) == 2:
        pass
    elif match == "time" and not reused and close:
        matched.append(f"wall-clock time ({minutes:g} min budgeted each, {ft:.0f} s vs {vt:.0f} s used; "
                       f"default model sizes; {steps})")
    elif fs is not None and fs == vs:
        matched.append(f"training steps ({fs} each)")
    if not any("steps" in m for m in matched):
        unmatched.append(steps)
    if not matched:
        return ("nothing but the test examples and their noise"
                + (f" (the {' and the '.join(reused)} were trained elsewhere)" if reused else "")
                + f"; {', '.join(unmatched)}")
    return "; ".join(matched) + (f"; not matched: {', '.join(unmatched)}" if unmatched else "")


# -- evaluation -------------------------------------------------------------------------------------
def _test_points(dataset: Dataset, config: TrainConfig, n: int) -> Tensor:
    """The first ``n`` test examples; images dequantized with the noise that
    :func:`pushforward.train.evaluate` uses."""
    if dataset.is_image:
        g = torch.Generator().manual_seed(seed_from(config.seed, 2))
        y = dequantize(dataset.test.images, int(dataset.levels or 0), generator=g)
        return y[:n] if n > 0 else y
    return dataset.test[:n] if n > 0 else dataset.test


@torch.no_grad()
def score(flow, vae: VAE, x: Tensor, ks: Sequence[int] = DEFAULT_KS, seed: int = 0, batch_size: int = 256,
          elbo_samples: int = 10, log: Callable[..., None] = say,
          progress: bool = False) -> dict[str, Tensor]:
    """Per-example nats on ``x``: ``flow_nll``, ``neg_elbo``, ``recon``, ``kl``, ``neg_iwae_<k>``.

    ``progress``: a progress bar for every pass that lasts over two seconds (IWAE with large ``k``)."""
    flow.eval()
    vae.eval()
    out: dict[str, list[Tensor]] = {}
    starts = range(0, len(x), max(1, batch_size))

    def add(name: str, value: Tensor) -> None:
        out.setdefault(name, []).append(value.double().cpu())

    def bar(label: str):
        return _progress(len(starts), label if progress else "")

    t0 = time.perf_counter()
    with bar("flow exact NLL") as b:
        for i in starts:
            add("flow_nll", -flow.log_prob(x[i : i + batch_size]))
            b.update(1)
    log(f"  flow exact NLL: {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(seed_from(seed, 5))
    with bar("VAE ELBO") as b:
        for i in starts:
            elbo, recon, kl = vae.elbo(x[i : i + batch_size], samples=elbo_samples)
            add("neg_elbo", -elbo)
            add("recon", recon)
            add("kl", kl)
            b.update(1)
    for k in ks:
        t0 = time.perf_counter()
        torch.manual_seed(seed_from(seed, 6, k))
        with bar(f"VAE IWAE k={k}") as b:
            for i in starts:
                add(f"neg_iwae_{k}", -vae.iwae(x[i : i + batch_size], k))
                b.update(1)
        log(f"  VAE IWAE k={k}: {time.perf_counter() - t0:.1f} s")
    return {k: torch.cat(v) for k, v in out.items()}


def _summary(scores: dict[str, Tensor], ks: Sequence[int], dims: int, levels: int | None,
             true_nll: Tensor | None) -> dict:
    def entry(values: Tensor) -> dict:
        mean, se = _mean_se(values)
        e = {"nats": mean, "nats_stderr": se}
        if levels is not None:
            e["bpd"] = float(bits_per_dim(mean, dims, levels))
            e["bpd_stderr"] = se / (dims * math.log(2))
        return e

    res: dict[str, Any] = {name: entry(v) for name, v in scores.items()}
    flow = scores["flow_nll"]
    kmax = max(ks)
    gaps = {"neg_elbo - flow_nll": scores["neg_elbo"] - flow,
            f"neg_iwae_{kmax} - flow_nll": scores[f"neg_iwae_{kmax}"] - flow,
            f"iwae_{kmax} - elbo": scores["neg_elbo"] - scores[f"neg_iwae_{kmax}"]}
    if true_nll is not None:
        res["true_nll"] = entry(true_nll)
        gaps["flow_nll - true_nll"] = flow - true_nll
        gaps[f"neg_iwae_{kmax} - true_nll"] = scores[f"neg_iwae_{kmax}"] - true_nll
    res["gaps"] = {}
    for name, v in gaps.items():  # paired differences: same examples, same noise
        mean, se = _mean_se(v)
        g = {"nats": mean, "nats_stderr": se}
        if levels is not None:
            g["bpd"], g["bpd_stderr"] = mean / (dims * math.log(2)), se / (dims * math.log(2))
        res["gaps"][name] = g
    return res


# -- figures ------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


@torch.no_grad()
def _samples_figure(path: Path, flow, vae: VAE, dataset: Dataset, x: Tensor, seed: int, title: str,
                    true_log_prob: Callable[[Tensor], Tensor] | None = None) -> Path:
    torch.manual_seed(seed)
    if dataset.is_image:
        n = 64
        panels = [("flow samples", flow.sample(n)), ("VAE samples  x ~ p(x | z)", vae.sample(n)),
                  ("VAE decoder medians (no pixel noise)", vae.sample(n, decoder_noise=False)),
                  ("test images", x[:n])]
        fig = _figure(4 * len(panels), 4.4)
        for ax, (name, images) in zip(fig.subplots(1, len(panels)), panels):
            grid = image_grid(quantize(images, int(dataset.levels or 0)), nrow=8)
            ax.imshow(grid[..., 0].numpy() if grid.shape[-1] == 1 else grid.numpy(), cmap="gray", vmin=0,
                      vmax=1, interpolation="nearest")
            ax.set_title(name, fontsize=10)
            ax.set_axis_off()
        fig.suptitle(title)
        fig.savefig(path)
        return path
    n = min(2000, len(x))
    data = x[:n, :2]
    bounds = data_bounds(data)
    scatters = [("test data", data), ("flow samples", flow.sample(n)[:, :2]),
                ("VAE samples  x ~ p(x | z)", vae.sample(n)[:, :2]),
                ("VAE decoder means", vae.sample(n, decoder_noise=False)[:, :2])]
    two_d = tuple(dataset.event_shape) == (2,)
    height = 4 * min(1.5, max(0.4, (bounds[3] - bounds[2]) / max(1e-12, bounds[1] - bounds[0]))) + 0.5
    fig = _figure(4 * len(scatters), (2 * height if two_d else height) + 0.4)
    axes = fig.subplots(2 if two_d else 1, len(scatters), squeeze=False)
    for ax, (name, pts) in zip(axes[0], scatters):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, linewidths=0,
                   color="C0" if name == "test data" else "C1")
        ax.set_title(name, fontsize=10)
    if two_d:
        res = 100
        flow_lp = density_grid(flow.log_prob, bounds, resolution=res, dtype=flow.dtype)[2]
        torch.manual_seed(seed)
        vae_lp = density_grid(partial(vae.iwae, k=100), bounds, resolution=res, batch_size=2048,
                              dtype=vae.dtype)[2]
        maps = [("flow density (exact)", flow_lp), ("VAE density, exp(IWAE k=100)", vae_lp)]
        if true_log_prob is not None:
            maps.insert(0, ("true density", density_grid(true_log_prob, bounds, resolution=res,
                                                          dtype=torch.float64)[2]))
        vmax = float(max(m.exp().max() for _, m in maps))
        for ax, (name, lp) in zip(axes[1], maps):
            ax.imshow(lp.exp().numpy(), origin="lower", extent=bounds, aspect="auto", cmap="viridis", vmin=0,
                      vmax=vmax)
            ax.set_title(name, fontsize=10)
        for ax in axes[1][len(maps):]:
            ax.set_axis_off()
    for ax in axes.flat:
        if ax.axison:
            ax.set_xlim(bounds[0], bounds[1])
            ax.set_ylim(bounds[2], bounds[3])
            ax.set_aspect("equal")
    fig.suptitle(title)
    fig.savefig(path)
    return path


def _bound_figure(path: Path, summary: dict, ks: Sequence[int], unit: str, title: str) -> Path:
    key, se_key = (unit, f"{unit}_stderr")
    label = "bits/dim" if unit == "bpd" else "nats per example"
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    iw = [summary[f"neg_iwae_{k}"] for k in ks]
    ax1.errorbar(ks, [e[key] for e in iw], yerr=[e[se_key] for e in iw], fmt="o-", color="C1", capsize=3,
                 label="VAE  -IWAE_k (upper bound on its NLL)")
    ax1.axhline(summary["neg_elbo"][key], color="C1", linestyle="--", label="VAE  -ELBO")
    ax1.axhline(summary["flow_nll"][key], color="C0", label="flow  exact NLL")
    if "true_nll" in summary:
        ax1.axhline(summary["true_nll"][key], color="k", linestyle=":", label="true density's NLL")
    ax1.set_xscale("log")
    ax1.set_xlabel("importance samples k")
    ax1.set_ylabel(f"test NLL ({label})")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax1.set_title("the bound tightens with k")
    gains = [summary["paired"][f"iwae_{k} - elbo"] for k in ks]
    ax2.errorbar(ks, [g[key] for g in gains], yerr=[g[se_key] for g in gains], fmt="o-", color="C1",
                 capsize=3, label="IWAE_k - ELBO (paired over the examples)")
    ax2.axhline(0, color="C1", linestyle="--", label="ELBO")
    ax2.set_xscale("log")
    ax2.set_xlabel("importance samples k")
    ax2.set_ylabel(f"IWAE_k - ELBO ({label})")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.set_title("how much tighter than the ELBO")
    fig.suptitle(title)
    fig.savefig(path)
    return path


# -- the report ---------------------------------------------------------------------------------------
def _fmt(e: dict | None, unit: str) -> str:
    if e is None:
        return "-"
    if unit == "bpd":
        return f"{e['bpd']:.4f} ± {e['bpd_stderr']:.4f}"
    return f"{e['nats']:.3f} ± {e['nats_stderr']:.3f}"


def _report(result: dict) -> str:
    s, f, v = result["scores"], result["flow"], result["vae"]
    ks = result["ks"]
    units = ["nats", "bpd"] if result["levels"] else ["nats"]
    lines = [f"# Flow versus VAE on {result['data']}", ""]
    lines.append(f"Command: `{result['command']}`")
    lines.append("")
    lines.append(
        f"Test examples scored: the first {result['n_eval']} of the test split ({result['split']}); "
        + ("images dequantized once with the seeded noise `pushforward eval` uses, the same `y` for both "
           "models. " if result["levels"] else "")
        + f"Matched: {result['match_description']}."
    )
    lines.append("")
    head = "| | flow | VAE |"
    lines += [head, "|---|---|---|"]
    lines.append(f"| model | `{f['recipe']}` | `vae` ({v['arch']}, latent {v['latent']}) |")
    lines.append(f"| parameters | {f['parameters']:,} | {v['parameters']:,} |")
    lines.append(f"| training steps | {f.get('steps', '-')} | {v.get('steps', '-')} |")
    def seconds(d: dict) -> str:
        return f"{d['train_seconds']:.1f}" if d.get("train_seconds") is not None else "-"

    lines.append(f"| training time (s) | {seconds(f)} | {seconds(v)} |")
    lines.append(f"| sampling speed (samples/s) | {f['samples_per_s']:,.0f} | {v['samples_per_s']:,.0f} |")
    for unit in units:
        name = "bits/dim" if unit == "bpd" else "nats"
        lines.append(f"| exact NLL ({name}) | {_fmt(s['flow_nll'], unit)} | intractable |")
        lines.append(f"| -ELBO ({name}) | - | {_fmt(s['neg_elbo'], unit)} |")
        for k in ks:
            lines.append(f"| -IWAE k={k} ({name}) | - | {_fmt(s[f'neg_iwae_{k}'], unit)} |")
    terms = f"{s['recon']['nats']:.3f}, {s['kl']['nats']:.3f}"
    lines.append(f"| ELBO terms (nats): reconstruction, KL | - | {terms} |")
    if "true_nll" in s:
        lines.append(f"| true density's NLL on the same points (nats) | {_fmt(s['true_nll'], 'nats')} | |")
    lines += ["", "Gaps (paired over the same examples; mean ± standard error):", "",
              "| gap | nats |" + (" bits/dim |" if result["levels"] else ""),
              "|---|---|" + ("---|" if result["levels"] else "")]
    kmax = max(ks)
    names = {"neg_elbo - flow_nll": "VAE -ELBO minus flow NLL",
             f"neg_iwae_{kmax} - flow_nll": f"VAE -IWAE_{kmax} minus flow NLL",
             f"iwae_{kmax} - elbo": f"VAE IWAE_{kmax} minus ELBO",
             "flow_nll - true_nll": "flow NLL minus the true density's",
             f"neg_iwae_{kmax} - true_nll": f"VAE -IWAE_{kmax} minus the true density's NLL"}
    for name, g in s["gaps"].items():
        row = f"| {names.get(name, name)} | {g['nats']:.3f} ± {g['nats_stderr']:.3f} |"
        if result["levels"]:
            row += f" {g['bpd']:.4f} ± {g['bpd_stderr']:.4f} |"
        lines.append(row)
    lines += [
        "",
        ("Reading the numbers: the flow's NLL is exact (up to the test sample). The VAE's `-ELBO` and "
         "`-IWAE_k` are upper bounds on its NLL in expectation; `-IWAE_k` decreases towards the VAE's "
         f"true NLL as k grows, so the VAE's NLL is at most about `-IWAE_{kmax}`. "
         f"`IWAE_{kmax} - ELBO` is a lower bound on the ELBO's gap to the VAE's log-likelihood."),
        "",
        "![samples](samples.png)",
        "",
        "![bound](bound.png)",
        "",
    ]
    return "\n".join(lines)


def compare(data: str, out: str | Path | None = None, match: str = "params", minutes: float = 0.0,
            max_steps: int = 0, flow_run: str | None = None, vae_run: str | None = None,
            flow_recipe: str = "", ks: Sequence[int] = DEFAULT_KS, eval_n: int = 500, seed: int = 0,
            sets: Sequence[str] = (), flow_sets: Sequence[str] = (), vae_sets: Sequence[str] = (),
            overwrite: bool = False, progress: bool = True, command: str = "") -> dict:
    """Runs the comparison; returns the result written to ``compare.json`` (see the module docstring)."""
    if match not in ("params", "time"):
        raise ValueError(f"--match must be 'params' or 'time', got {match!r}")
    ks = sorted({int(k) for k in ks})
    budget = test_budget()  # the README's commands in the test suite: a few steps, small k
    if budget:
        ks = [k for k in ks if k <= 10] or [1]
        max_steps = budget
    if not ks or ks[0] < 1:
        raise ValueError(f"--ks needs positive sample counts, got {ks}")
    out = Path(out) if out else Path("runs") / "compare" / Path(data).stem
    out.mkdir(parents=True, exist_ok=True)
    extra = {} if progress else {"progress": False}
    fcfg = _config(data, out / "flow", seed, [*sets, *flow_sets],
                   {**extra, **({"recipe": flow_recipe} if flow_recipe else {})})
    vcfg = _config(data, out / "vae", seed, [*sets, *vae_sets], {**extra, "recipe": "vae"})
    for cfg in (fcfg, vcfg):
        if getattr(cfg, "condition", ""):
            raise ValueError("compare scores unconditional models; drop condition = 'label'")
    dataset = load_dataset(fcfg)
    flow_stats = vae_stats = None
    flow = vae = None
    if flow_run:
        flow, fcfg, flow_stats = _open(flow_run, "flow")
    if vae_run:
        vae, vcfg, vae_stats = _open(vae_run, "vae")
    for name in ("data", "seed", "n_train", "n_val", "n_test", "val_fraction", "test_fraction"):
        if getattr(fcfg, name) != getattr(vcfg, name):
            raise ValueError(f"the flow and the VAE were trained on different data: {name} = "
                             f"{getattr(fcfg, name)!r} vs {getattr(vcfg, name)!r}")
    if flow_run:
        dataset = load_dataset(fcfg)
    if fcfg.max_train != vcfg.max_train:
        say(f"note: max_train differs (flow {fcfg.max_train}, VAE {vcfg.max_train}); "
            "the test split is the same")

    # matching
    flow_params = count_parameters(flow) if flow is not None else count_parameters(build_flow(fcfg, dataset))
    width_matched = False
    if match == "params":
        if vae is None:
            vcfg.model, vae_params = match_vae_width(flow_params, dataset.event_shape, vcfg.model)
            width_matched = True
            say(f"VAE width matched to the flow's {flow_params:,} parameters: {vcfg.model} ({vae_params:,})")
        steps = max_steps
        if steps <= 0 and flow_stats and flow_stats.get("steps") and vae is None:
            steps = flow_stats["steps"]  # give the VAE the reused flow's budget
        elif steps <= 0 and vae_stats and vae_stats.get("steps") and flow is None:
            steps = vae_stats["steps"]  # give the flow the reused VAE's budget
        elif steps <= 0:
            steps = fcfg.max_steps  # 0: the data set's default epochs, the same for both
        for cfg, trained in ((fcfg, flow), (vcfg, vae)):
            if trained is None:
                if steps > 0:
                    cfg.max_steps = steps
                if minutes > 0:
                    cfg.max_minutes = minutes
    else:
        minutes = minutes if minutes > 0 else 1.0
        for cfg, trained in ((fcfg, flow), (vcfg, vae)):
            if trained is None:
                cfg.max_steps = budget or calibrate_steps(cfg, 0.9 * minutes)
                cfg.max_minutes = minutes
                cfg.patience = 0
    for cfg in (fcfg, vcfg):
        if cfg.max_steps > 0 and cfg.val_every == 0:
            cfg.val_every = max(1, cfg.max_steps // 10)

    # training
    reused = [name for name, model in (("flow", flow), ("VAE", vae)) if model is not None]
    if flow is None:
        say(f"\n== training the flow ({fcfg.recipe}) -> {fcfg.run_dir}")
        flow_stats = _train(fcfg, "flow", overwrite)
        flow = _open(fcfg.run_dir, "flow")[0]
    if vae is None:
        say(f"\n== training the VAE -> {vcfg.run_dir}")
        vae_stats = _train(vcfg, "vae", overwrite)
        vae = _open(vcfg.run_dir, "vae")[0]

    description = _matched(match, reused, width_matched, minutes, count_parameters(flow),
                           count_parameters(vae), flow_stats or {}, vae_stats or {})
    say(f"Matched: {description}.")

    # scoring
    x = _test_points(dataset, fcfg, eval_n)
    say(f"\n== scoring {len(x)} test examples (IWAE k = {', '.join(map(str, ks))})")
    scores = score(flow, vae, x.to(flow.dtype), ks, seed=fcfg.seed, progress=progress)
    true_log_prob = dataset_entry(fcfg).log_prob  # known for most toy densities
    true_nll = None if true_log_prob is None else -true_log_prob(x).double()
    levels = dataset.levels
    summary = _summary(scores, ks, math.prod(dataset.event_shape), levels, true_nll)
    summary["paired"] = {}  # per k, paired over the examples
    dims = math.prod(dataset.event_shape)
    for k in ks:
        for name, d in ((f"neg_iwae_{k} - flow_nll", scores[f"neg_iwae_{k}"] - scores["flow_nll"]),
                        (f"iwae_{k} - elbo", scores["neg_elbo"] - scores[f"neg_iwae_{k}"])):
            mean, se = _mean_se(d)
            summary["paired"][name] = {"nats": mean, "nats_stderr": se, "bpd": mean / (dims * math.log(2)),
                                       "bpd_stderr": se / (dims * math.log(2))}
    n_speed = 256 if dataset.is_image else 2000
    flow_info = {"recipe": flow.recipe["recipe"], "config": flow.recipe, "parameters": count_parameters(flow),
                 "samples_per_s": sampling_speed(flow, n_speed), "run_dir": str(Path(fcfg.run_dir)),
                 **(flow_stats or {})}
    vae_info = {"arch": "conv" if hasattr(vae.encoder, "nets") else "mlp", "latent": vae.latent,
                "config": vae.recipe, "parameters": count_parameters(vae),
                "samples_per_s": sampling_speed(vae, n_speed), "run_dir": str(Path(vcfg.run_dir)),
                **(vae_stats or {})}
    result = {
        "data": dataset.name, "n_eval": len(x),
        "split": dataset.info.get("split", f"fresh samples seeded from seed {fcfg.seed}"),
        "dims": math.prod(dataset.event_shape), "levels": levels, "ks": ks, "match": match,
        "match_description": description, "command": command or f"pushforward compare --data {data}",
        "flow": flow_info, "vae": vae_info, "scores": summary,
    }

    title = (f"{dataset.name}: flow ({flow_info['recipe']}, {flow_info['parameters']:,} params) "
             f"vs VAE ({vae_info['parameters']:,} params)")
    _samples_figure(out / "samples.png", flow, vae, dataset, x, fcfg.seed, title, true_log_prob)
    _bound_figure(out / "bound.png", summary, ks, "bpd" if levels else "nats", title)
    files = ("report.md", "compare.json", "samples.png", "bound.png")
    result["files"] = {name: str(out / name) for name in files}
    text = json.dumps(result, indent=1)
    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(text))
    report = _report(result)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(report))
    say("\n" + report)
    say(f"wrote {out / 'report.md'}, {out / 'compare.json'}, {out / 'samples.png'}, {out / 'bound.png'}")
    return result
