"""The ``pushforward`` command line: ``train``, ``eval``, ``sample``, ``plot``, ``compare`` and ``demo``.

A thin argparse layer: each command turns its options into one call of :mod:`pushforward.runs` (or
:func:`pushforward.compare.compare`) and the result into an exit status. The parser needs only the
data set registry (:mod:`pushforward.data.registry`) for its help and choices, so ``pushforward --help``
imports no torch; a command imports :mod:`~pushforward.runs` (and with it torch) when it runs.
Run ``pushforward <command> --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import NoReturn

from .config import parse_overrides
from .data import registry
from .options import CONFIG_RULES, check_key, parse_option
from .runtime import tune_allocator

__all__ = ["build_parser", "main"]


# -- train -------------------------------------------------------------------------------------------
def _overrides(args: argparse.Namespace) -> dict:
    """The config keys given by ``--set`` and by the dedicated flags (flags win)."""
    values = parse_overrides(args.set)
    # each checked before a flag replaces it (--set progress=maybe --no-progress)
    for key, value in values.items():
        if key in CONFIG_RULES:
            check_key(key, value)
    for key in ("data", "run_dir", "max_minutes", "epochs", "max_steps", "seed", "device", "recipe",
                "condition", "dequantization", "objective"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if getattr(args, "no_progress", False):
        values["progress"] = False
    for flag in ("amp", "compile", "checkpoint_grads"):
        if getattr(args, flag, False):
            values[flag] = True
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from . import runs
    from .train import NonFiniteLossError

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --run-dir and --overwrite starts it afresh: give one "
                         "of them")
    config = runs.train_config(args.config, _overrides(args), resume=args.resume)
    try:
        history, _, _ = runs.train_run(config, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as e:
        runs.say(f"training stopped: {e}")
        return 1
    best = history.best_val_nll
    figure = ("NLL", "nats") if config.objective == "nll" else (  # flow matching validates on its own loss
        f"{config.objective} loss", "(squared velocity; pushforward eval scores the likelihood by the ODE)")
    runs.say(f"stopped ({history.stop_reason}) at step {history.step}; best validation {figure[0]} "
             f"{best:.4f} {figure[1]} at step {history.best_step}" if best is not None else
             f"stopped ({history.stop_reason}) at step {history.step} before any validation")
    if history.stop_reason == "interrupted":
        import signal

        signum = history.signal or signal.SIGINT
        saved = runs.last_checkpoint(config.run_dir)
        runs.say(f"stopped by {signal.Signals(signum).name}; {saved}; continue with: "
                 f"pushforward train --resume --run-dir {shlex.quote(str(config.run_dir))}")
        return 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM
    runs.say(f"results in {config.run_dir}; next: pushforward eval {config.run_dir}")
    return 0


# -- eval, sample, plot ----------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from . import runs

    result = runs.evaluate_run(args.run, args.split, args.batch_size, args.checkpoint,
                               progress=not args.no_progress)
    runs.say(runs.describe_eval(result))  # first: a failing write must not lose the result
    try:
        runs.say(f"wrote {runs.write_eval(result)}")
    except OSError as e:
        print(f"pushforward eval: error: could not write {result['path']} ({e.strerror or e}); the result "
              "above was not saved", file=sys.stderr, flush=True)
        return 1
    return 0 if result["finite"] else 1


def cmd_sample(args: argparse.Namespace) -> int:
    from . import runs

    for path in runs.sample_run(args.run, args.n, args.temperature, args.out, args.interpolate, args.seed,
                                args.label, args.guidance):
        runs.say(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import runs

    runs.say(f"wrote {runs.plot_run(args.run, args.out)}")
    return 0


# -- demo, compare -----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from . import runs

    results = runs.demo(args.out, args.density, args.images, args.density_steps, args.image_steps,
                        args.max_minutes)
    return 0 if all(r["eval"]["finite"] for r in results.values()) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import DEFAULT_KS, compare

    ks = args.ks if args.ks is not None else DEFAULT_KS
    command = ["pushforward", "compare", "--data", args.data]
    for flag, value in (("--run-dir", args.run_dir), ("--match", args.match), ("--minutes", args.minutes),
                        ("--max-steps", args.max_steps), ("--flow", args.flow), ("--vae", args.vae),
                        ("--flow-recipe", args.flow_recipe),
                        ("--ks", ",".join(map(str, args.ks)) if args.ks else None), ("--eval-n", args.eval_n),
                        ("--seed", args.seed)):
        if value is not None:
            command += [flag, str(value)]
    for flag, values in (("--set", args.set), ("--flow-set", args.flow_set), ("--vae-set", args.vae_set)):
        for value in values or []:
            command += [flag, value]
    command += ["--overwrite"] * args.overwrite + ["--no-progress"] * args.no_progress
    compare(args.data, args.run_dir, args.match, args.minutes or 0.0, args.max_steps or 0, args.flow,
            args.vae, args.flow_recipe or "", ks, args.eval_n, args.seed, args.set or [], args.flow_set or [],
            args.vae_set or [], args.overwrite, not args.no_progress, shlex.join(command))
    return 0


# -- parser --------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``pushforward train: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _typed(name: str):
    """The ``type=`` of an option: its rule in :mod:`pushforward.options` (``command.option`` or a
    config key)."""

    def convert(text: str):
        try:
            return parse_option(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name.rpartition(".")[2]
    return convert


def _ks(text: str) -> list[int]:
    """``--ks 1,10,100``: positive sample counts."""
    ks = [_typed("compare.ks")(k.strip()) for k in text.split(",") if k.strip()]
    if not ks:
        raise argparse.ArgumentTypeError(f"needs at least one sample count, got {text!r}")
    return ks


def _datasets_epilog() -> str:
    return "data sets (--data):\n" + registry.describe()


def _listed(entries: list[registry.DatasetEntry]) -> str:
    return ", ".join(e.metavar or e.name for e in entries)


def _data_help() -> str:
    toys = registry.names("toy2d")
    others = [n for n in registry.names() if n not in toys]
    files = _listed([e for e in registry.entries() if e.claims is not None])
    return (f"a toy density ({'|'.join(toys)}), {'|'.join(others)}, or {files} "
            "(the list with each one's defaults: pushforward --help; default: moons)")


def build_parser() -> argparse.ArgumentParser:
    """The ``pushforward`` parser; its data set help and choices come from the registry.

    Every option has help text that states its default; a value out of its range (its rule in
    :mod:`pushforward.options`) is a one-line usage error naming the option, the value and what is allowed.
    """
    formatter = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="pushforward", formatter_class=formatter, epilog=_datasets_epilog(),
                description="Train, evaluate and sample normalizing flows.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="train | eval | sample | plot | demo | compare (pushforward COMMAND --help)")
    data_help = _data_help()
    labelled = _listed([e for e in registry.entries() if e.classes])
    images = _listed([e for e in registry.entries() if e.kind == "image"])
    from_data = "default: the data set's, see pushforward --help"

    t = sub.add_parser("train", help="train a flow (exact maximum likelihood)", epilog=_datasets_epilog(),
                       formatter_class=formatter,
                       description="Train a flow by exact maximum likelihood. Several processes (DDP): "
                                   "torchrun --nproc-per-node N -m pushforward train ... (batch_size is the "
                                   "global batch; see docs/scaling.md). Ctrl-C or SIGTERM: finish the step, "
                                   "save a checkpoint, stop (a second one aborts).")
    t.add_argument("--config", metavar="FILE.toml",
                   help="TOML file with TrainConfig keys ([model] table: recipe arguments; default: none)")
    t.add_argument("--data", help=data_help)
    t.add_argument("--run-dir", dest="run_dir",
                   help="run directory (default: runs/<data>, plus -<recipe>, -label or -variational when "
                        "they differ from the data set's default run)")
    t.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --run-dir (or in the default directory of --data)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --run-dir: its files are removed once the new data and model "
                        "are built and checked")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. lr=5e-4 or model.hidden=[64,64] (repeatable; "
                        "default: none)")
    t.add_argument("--max-minutes", dest="max_minutes", type=_typed("train.max_minutes"), metavar="M",
                   help="wall-clock budget; the run validates, saves and stops within it (default: 0, none)")
    t.add_argument("--epochs", type=_typed("train.epochs"), metavar="N",
                   help=f"passes over the training set ({from_data})")
    t.add_argument("--max-steps", dest="max_steps", type=_typed("train.max_steps"), metavar="N",
                   help="optimizer steps in all; the cosine schedule spans them "
                        "(default: 0, --epochs decides)")
    t.add_argument("--recipe", help=f"nice|realnvp|realnvp_image|glow|maf|iaf|nsf|vae|... ({from_data})")
    t.add_argument("--seed", type=_typed("train.seed"), metavar="N",
                   help="seeds the model, the split, the order and the noise (default: 0)")
    t.add_argument("--device", type=_typed("train.device"),
                   help="auto|cpu|cuda|cuda:N|mps (default: auto, cuda if available, else cpu; "
                        "under torchrun auto/cuda mean cuda:LOCAL_RANK)")
    t.add_argument("--amp", action="store_true",
                   help="bf16 autocast in the conditioner networks (log-dets and loss stay float32); "
                        "for GPUs")
    t.add_argument("--compile", action="store_true",
                   help="train through torch.compile (after ActNorm's eager init)")
    t.add_argument("--checkpoint-grads", dest="checkpoint_grads", action="store_true",
                   help="gradient checkpointing: recompute each layer in the backward pass (less memory)")
    t.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    t.add_argument("--condition", choices=("label",),
                   help=f"label: a class-conditional image model p(x | label), the one-hot label as context "
                        f"(labelled data: {labelled}; default: unconditional)")
    t.add_argument("--dequantization", choices=("uniform", "variational"),
                   help=f"images ({images}): uniform noise or a variational dequantizer q(u | x) trained "
                        "jointly (--set dequantizer.layers=4 --set dequantizer.hidden_channels=32); "
                        "default: uniform")
    t.add_argument("--objective", choices=("nll", "flow-matching", "ot-flow-matching"),
                   help="what training minimises: nll (default), or for continuous flows (--recipe cnf, "
                        "cnf_image) flow matching without an ODE solve, with independent or minibatch-OT "
                        "noise; eval scores the likelihood by the ODE either way")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="test NLL / bits-per-dim and reconstruction error; writes eval.json")
    e.add_argument("run", help="run directory, checkpoint directory or .safetensors file")
    e.add_argument("--split", default="test", choices=("test", "val", "train"),
                   help="which split to score (default: test)")
    e.add_argument("--batch-size", dest="batch_size", type=_typed("eval.batch_size"), metavar="N",
                   help="examples per chunk; the noise is seeded per chunk "
                        "(default: the run's eval_batch_size)")
    e.add_argument("--checkpoint", action="store_true",
                   help="use the last checkpoint instead of the best weights")
    e.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="image grid, or 2-D samples and density map, as PNG")
    s.add_argument("run", help="run directory, checkpoint directory or .safetensors file")
    s.add_argument("--n", type=_typed("sample.n"), default=64, metavar="N",
                   help="number of samples (default: 64)")
    s.add_argument("--temperature", type=_typed("sample.temperature"), default=1.0, metavar="T",
                   help="scale of the base density's samples, > 0 (default: 1.0)")
    s.add_argument("--out", metavar="FILE.png", help="PNG path (default: RUN/samples[_T<t>].png)")
    s.add_argument("--interpolate", action="store_true",
                   help="also a latent interpolation between test images")
    s.add_argument("--seed", type=_typed("sample.seed"), default=0, metavar="N",
                   help="seed of the samples (default: 0)")
    s.add_argument("--label", type=_typed("sample.label"), metavar="K",
                   help="class-conditional runs: sample this class (default: one row per class)")
    s.add_argument("--guidance", type=_typed("sample.guidance"), default=0.0, metavar="W",
                   help="class-conditional Transformer flows (tarflow, jet): classifier-free guidance of "
                        "weight W >= 0, against the null label that training with --set label_drop=P "
                        "showed (default: 0, none)")
    s.set_defaults(fn=cmd_sample)

    c = sub.add_parser("plot", help="training curves to PNG")
    c.add_argument("run", help="run directory (reads its metrics.jsonl)")
    c.add_argument("--out", metavar="FILE.png", help="PNG path (default: RUN/curves.png)")
    c.set_defaults(fn=cmd_plot)

    d = sub.add_parser("demo", help="train, evaluate and plot a 2-D density and a digits model end to end",
                       description="Trains a fixed number of steps (the result does not depend on the "
                                   "machine's speed; about 3 minutes on 2 CPU cores), then evaluates, "
                                   "samples and plots; reports the time it took.")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--density-steps", dest="density_steps", type=_typed("demo.density_steps"), default=6000,
                   metavar="N", help="optimizer steps of the 2-D model (default: 6000)")
    d.add_argument("--image-steps", dest="image_steps", type=_typed("demo.image_steps"), default=3000,
                   metavar="N", help="optimizer steps of the image model (default: 3000)")
    d.add_argument("--max-minutes", dest="max_minutes", type=_typed("demo.max_minutes"), default=0.0,
                   metavar="M", help="cap on each training; the result then depends on the machine "
                                     "(default: 0, none)")
    d.add_argument("--density", default="moons", choices=registry.names("toy2d"),
                   help="2-D toy density (default: moons)")
    d.add_argument("--images", default="digits", choices=[*registry.names("image"), ""],
                   help="image data set, '' to skip (default: digits)")
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("compare", help="flow vs VAE on the same data: exact NLL vs ELBO/IWAE, time, samples",
                       epilog=_datasets_epilog(), formatter_class=formatter,
                       description="The lecture's flows-versus-VAEs comparison: trains (or reopens) a flow "
                                   "and a VAE on the same split and scores both on the same test examples "
                                   "(pushforward.compare).")
    m.add_argument("--data", required=True, help=data_help.replace("; default: moons", "; required"))
    m.add_argument("--run-dir", dest="run_dir", help="output directory (default: runs/compare/<data>)")
    m.add_argument("--match", choices=("params", "time"), default="params",
                   help="params: VAE width matched to the flow's parameter count, same steps; "
                        "time: default sizes, --minutes of training each (default: params)")
    m.add_argument("--minutes", type=_typed("compare.minutes"), metavar="M",
                   help="time mode: minutes per model (default: 1); params mode: a cap per model "
                        "(default: none)")
    m.add_argument("--max-steps", dest="max_steps", type=_typed("compare.max_steps"), metavar="N",
                   help="params mode: steps for both (default: the data set's epochs)")
    m.add_argument("--flow", metavar="RUN",
                   help="reuse a trained flow run instead of training one (default: train one)")
    m.add_argument("--vae", metavar="RUN",
                   help="reuse a trained VAE run (pushforward train --recipe vae) instead of training one "
                        "(default: train one)")
    m.add_argument("--flow-recipe", dest="flow_recipe", help="flow recipe (default: the data set's)")
    m.add_argument("--ks", type=_ks, metavar="K,K,...",
                   help="IWAE sample counts, comma-separated (default: 1,10,100,1000)")
    m.add_argument("--eval-n", dest="eval_n", type=_typed("compare.eval_n"), default=500, metavar="N",
                   help="test examples scored, 0: all; IWAE costs k decoder passes per example "
                        "(default: 500)")
    m.add_argument("--seed", type=_typed("compare.seed"), default=0, metavar="N",
                   help="seed of both runs and of the scoring (default: 0)")
    m.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for both models (repeatable; default: none)")
    m.add_argument("--flow-set", dest="flow_set", action="append", metavar="KEY=VALUE",
                   help="override for the flow (repeatable; default: none)")
    m.add_argument("--vae-set", dest="vae_set", action="append", metavar="KEY=VALUE",
                   help="override for the VAE (repeatable; default: none)")
    m.add_argument("--overwrite", action="store_true", help="retrain runs already in the run directory")
    m.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")
    m.set_defaults(fn=cmd_compare)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs ``pushforward ARGV``; returns the exit status.

    2: a usage or input error (nothing was changed), 1: a failure while working (a NaN loss, a full
    disk; the message names what is intact), 130 / 143: stopped by Ctrl-C / SIGTERM after saving. An
    error is one line on stderr; ``PUSHFORWARD_DEBUG=1`` shows the traceback of an unexpected one.
    """
    args = build_parser().parse_args(argv)
    tune_allocator()  # reuse freed memory instead of page-faulting fresh pages every step (see runtime.py)
    where = f"pushforward {args.command}"
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        from .runs import say

        say("interrupted")
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            ImportError) as e:
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1
    except FloatingPointError as e:  # train.NonFiniteLossError, e.g. inside demo or compare
        print(f"{where}: error: training stopped: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        if os.environ.get("PUSHFORWARD_DEBUG"):
            raise
        print(f"{where}: internal error: {type(e).__name__}: {_one_line(e)} (PUSHFORWARD_DEBUG=1 shows the "
              "traceback; please report it)", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
