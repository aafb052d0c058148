"""Tables at default settings (issue 16; issue 15 item 7): grid columns and their bound, the Gaussian floor,
training sized in steps, and tables that cannot be modelled as given."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pushforward.data.tabular import ConstantColumnsWarning, grid_steps, load_table
from pushforward.objectives import Batch, ColumnDequantization
from pushforward.transforms import GaussianWhitening

REPO = Path(__file__).resolve().parent.parent


def _csv(path: Path, table: np.ndarray, names: list[str] | None = None) -> Path:
    names = names or [f"c{j}" for j in range(table.shape[1])]
    np.savetxt(path, table, delimiter=",", header=",".join(names), comments="")
    return path


def _config(csv: Path, run_dir: Path, **overrides):
    from pushforward.runs import train_config

    return train_config(
        overrides={"data": str(csv), "run_dir": str(run_dir), "progress": False, "threads": 1, **overrides}
    )


# -- detection and the bound -------------------------------------------------------------------------
def test_grid_steps_detects_integers_and_few_values_on_a_grid():
    rng = np.random.default_rng(0)
    table = np.c_[
        rng.integers(0, 3, 200) * 2,  # integers 0, 2, 4: step 2
        rng.integers(0, 5, 200) * 0.25 + 0.5,  # 5 values on a 0.25 grid
        rng.normal(size=200),  # continuous
        rng.integers(-50, 900, 200),  # integers, many values: step = gcd of the gaps
        np.round(rng.normal(size=200), 2),
    ]  # 2 decimals, many values: continuous
    steps = grid_steps(table)
    assert (
        steps[0] == 2
        and steps[1] == pytest.approx(0.25)
        and steps[2] == 0
        and steps[3] == 1
        and steps[4] == 0
    )


def test_integer_table_gets_the_hand_computed_bound(tmp_path):
    """A table of integers: the objective's figure is -log N(x + (u - 1/2) h) - sum log h, with h = 1 / std
    in standardised units, and it bounds the exact -log P(x) of the Gaussian's discretisation."""
    from pushforward.experiment import load_dataset
    from pushforward.models import gaussian
    from pushforward.runs import run_objective

    rng = np.random.default_rng(1)
    table = rng.integers(0, 6, size=(400, 2)).astype(float)
    config = _config(_csv(tmp_path / "ints.csv", table), tmp_path / "run")
    dataset = load_dataset(config)
    std = np.asarray(dataset.info["std"])
    assert dataset.info["grid_steps"] == pytest.approx((1 / std).tolist())
    model = gaussian(2).eval()  # uninitialised: the identity, i.e. a standard normal density
    objective = run_objective(config, model, dataset)
    assert isinstance(objective, ColumnDequantization) and objective.grid_columns == ["c0", "c1"]
    x = dataset.test
    figure = objective.evaluate(model, Batch(x), torch.Generator().manual_seed(7))["loss"]
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    h = torch.as_tensor(1 / std, dtype=torch.float32)
    y = (x + (u - 0.5) * h).double()
    hand = (0.5 * y.square() + 0.5 * math.log(2 * math.pi)).sum(1) - torch.log(h.double()).sum()
    torch.testing.assert_close(figure.double(), hand, atol=1e-5, rtol=0)
    # the bound is above the exact code length of the discrete values under the same Gaussian
    normal = torch.distributions.Normal(0.0, 1.0)
    xd, hd = x.double(), h.double()
    exact = -torch.log(normal.cdf(xd + hd / 2) - normal.cdf(xd - hd / 2)).sum(1)
    assert float(figure.mean()) >= float(exact.mean()) - 1e-6
    assert float(figure.mean()) < float(exact.mean()) + 0.2  # and close to it for a smooth density


def test_dequantization_none_turns_it_off(tmp_path):
    from pushforward.experiment import load_dataset
    from pushforward.models import gaussian
    from pushforward.objectives import NLL
    from pushforward.runs import run_objective

    table = np.random.default_rng(2).integers(0, 4, size=(100, 3)).astype(float)
    config = _config(_csv(tmp_path / "ints.csv", table), tmp_path / "run", dequantization="none")
    dataset = load_dataset(config)
    assert isinstance(run_objective(config, gaussian(3), dataset), NLL)
    assert "unbounded" in dataset.info["notes"][0]


# -- the Gaussian floor --------------------------------------------------------------------------------
@pytest.mark.parametrize("features", [1, 4, 12])
@pytest.mark.parametrize("gaussian_at", ["start", "end"])
def test_untrained_default_model_is_the_gaussian_fit(features, gaussian_at):
    from pushforward.data.tabular import initialize_from_table
    from pushforward.models import tabular
    from pushforward.objectives import NLL

    torch.manual_seed(0)
    x = torch.randn(300, features) @ torch.randn(features, features) + torch.randn(features)
    flow = tabular(features, gaussian_at=gaussian_at)
    initialize_from_table(flow, x, NLL(), seed=0)
    x64 = x.double()
    cov = torch.cov(x64.T, correction=0).reshape(features, features)
    reference = torch.distributions.MultivariateNormal(x64.mean(0), covariance_matrix=cov)
    assert abs(float(flow.log_prob(x).double().mean() - reference.log_prob(x64).mean())) < 1e-4
    test = torch.randn(50, features) @ torch.randn(features, features)
    torch.testing.assert_close(
        flow.log_prob(test).double(), reference.log_prob(test.double()), atol=1e-3, rtol=1e-4
    )


def test_sized_defaults_place_the_gaussian_by_table_size():
    from pushforward.data.tabular import sized_defaults

    assert sized_defaults(500, 9)["model"]["gaussian_at"] == "end"
    assert sized_defaults(5_000, 9)["model"]["gaussian_at"] == "start"
    with pytest.raises(ValueError, match="gaussian_at"):
        from pushforward.models import tabular

        tabular(3, gaussian_at="middle")


def test_weight_decay_is_sized_to_the_table_and_a_users_value_is_kept(tmp_path):
    """Small tables get Adam's L2 penalty, large ones none, a value the user gives is kept, and the
    sentinel ``-1`` means none outside tables (the optimizer never sees a negative decay)."""
    from pushforward.config import resolve_config
    from pushforward.experiment import load_dataset
    from pushforward.train import make_optimizer

    rng = np.random.default_rng(0)
    small = _csv(tmp_path / "small.csv", rng.normal(size=(200, 3)))
    large = _csv(tmp_path / "large.csv", rng.normal(size=(2_000, 3)))
    sized = {}
    runs = (("small", small, {}), ("large", large, {}), ("user", small, {"weight_decay": 0.5}))
    for name, csv, extra in runs:
        config = _config(csv, tmp_path / name, **extra)
        assert config.weight_decay == extra.get("weight_decay", -1)
        load_dataset(config)
        sized[name] = config.weight_decay
    assert sized == {"small": 3e-3, "large": 0.0, "user": 0.5}
    moons = resolve_config({}, {"data": "moons", "weight_decay": -1})
    optimizer = make_optimizer(moons, [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("far", [50.0, 1e4])
def test_outlier_row_scores_near_the_gaussian(far):
    """A row far outside the training data (whitened value ``far`` in one coordinate, as in Shuttle's test
    rows) scores within the flow's largest excess over the Gaussian on its training rows. Why that bound:
    the far coordinate passes every spline through its identity tails, so its quadratic term is the
    Gaussian's (same whitening layer); the other coordinates' spline parameters come from conditioners
    that read the far value soft-clipped to ``input_bound``, i.e. from inputs in the range of the training
    rows. Without the clip (``input_bound=0``) the same conditioners scale their parameters with ``far``."""
    from pushforward import initialize
    from pushforward.models import gaussian, tabular
    from pushforward.transforms import Autoregressive

    torch.manual_seed(0)
    d = 4
    x = torch.randn(500, d) @ torch.randn(d, d)
    reference = gaussian(d)
    initialize(reference, x)
    reference.eval()
    chol = torch.linalg.cholesky(torch.cov(x.T, correction=0))
    row = (x.mean(0) + chol @ torch.tensor([far, 0.5, -0.3, 0.2]))[None]
    excess = {}
    for bound in (4.0, 0.0):
        torch.manual_seed(1)
        flow = tabular(d, layers=3, hidden=(32, 32), input_bound=bound)
        initialize(flow, x)
        with torch.no_grad():  # "trained" conditioners: the zero-initialised last layers get weights
            for layer in flow.modules():
                if isinstance(layer, Autoregressive):
                    last = [m for m in layer.net.modules() if isinstance(m, torch.nn.Linear)][-1]
                    last.weight.normal_(0, 0.3)
        flow.eval()
        with torch.no_grad():
            on_train = float((reference.log_prob(x) - flow.log_prob(x)).max())
            excess[bound] = float(reference.log_prob(row) - flow.log_prob(row))
        assert math.isfinite(excess[bound])
        if bound:
            assert excess[bound] <= on_train, (excess, on_train)
    assert excess[0.0] > excess[4.0] + 10  # the clip is what bounds it


def test_gaussian_whitening_shrinkage():
    """A fixed weight gives the Gaussian of (1 - a) S + a (tr S / D) I; Ledoit-Wolf's weight is small for
    many rows and larger for few; the table entry's model starts at the shrunk Gaussian."""
    torch.manual_seed(0)
    mix = torch.randn(5, 5)
    x = torch.randn(40, 5) @ mix
    layer = GaussianWhitening(5, shrinkage=0.3)
    layer.fit(x)
    cov = torch.cov(x.double().T, correction=0)
    shrunk = 0.7 * cov + 0.3 * cov.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    reference = torch.distributions.MultivariateNormal(x.double().mean(0), covariance_matrix=shrunk)
    from pushforward.core import Compose, Flow
    from pushforward.distributions import StandardNormal

    flow = Flow(Compose(layer), StandardNormal(5))
    expected = reference.log_prob(x.double())
    torch.testing.assert_close(flow.log_prob(x).double(), expected, atol=1e-3, rtol=1e-4)
    from pushforward.transforms.linear import _ledoit_wolf

    def weight(rows):
        y = (torch.randn(rows, 5) @ mix).double()
        c = y - y.mean(0)
        cov = c.T @ c / rows
        return _ledoit_wolf(c, cov, float(cov.diagonal().mean()))

    assert 0 <= weight(20_000) < 0.01 < weight(20) <= 1
    with pytest.raises(ValueError, match="shrinkage"):
        GaussianWhitening(3, shrinkage=1.5)


def test_gaussian_whitening_handles_a_singular_covariance():
    x = torch.randn(5, 8)  # fewer rows than features
    layer = GaussianWhitening(8)
    layer.fit(x)
    z, ladj = layer(x)
    assert bool(layer.initialized) and torch.isfinite(z).all() and torch.isfinite(ladj).all()


def test_train_and_eval_report_the_gaussian_beside_the_flow(tmp_path):
    """Steps, not epochs, on a tiny table: sized defaults, early stopping, best weights restored, and the
    flow's test NLL beside (and not worse than) the Gaussian's."""
    from pushforward.runs import describe_eval, eval_run, train_run

    rng = np.random.default_rng(3)
    z = rng.normal(size=(60, 3))
    table = np.c_[z[:, 0], z[:, 0] ** 2 + 0.3 * z[:, 1], z[:, 2]]
    config = _config(_csv(tmp_path / "tiny.csv", table), tmp_path / "run")
    history, dataset, flow = train_run(config)
    assert (
        config.max_steps >= 2000 and 10 <= config.val_every <= 100
    )  # sized in steps, not 50 one-step epochs
    assert history.step > 200 and [r["step"] for r in history.rows[:2]] == [0, config.val_every]
    assert history.stop_reason in ("early_stopping", "completed")
    from pushforward.train import evaluate

    val = evaluate(flow, dataset.val, seed=config.seed, device="cpu", reconstruction=False)
    assert val["nll"] == pytest.approx(history.best_val_nll, abs=1e-4)  # the best weights are restored
    result = eval_run(tmp_path / "run")
    assert math.isfinite(result["gaussian_nll"])
    assert result["nll"] <= result["gaussian_nll"] + result["nll_stderr"]
    assert "Gaussian" in describe_eval(result)


def test_training_that_only_harms_ends_at_the_gaussian_start(tmp_path):
    """Tables validate before the first step, so a run whose steps only make the model worse (here a
    learning rate far too large) ends with the starting weights, the Gaussian fit, not a worse model."""
    from pushforward.runs import train_run
    from pushforward.train import evaluate

    rng = np.random.default_rng(4)
    table = rng.normal(size=(200, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    config = _config(_csv(tmp_path / "g.csv", table), tmp_path / "run", lr=0.3, warmup_steps=0,
                     max_steps=40, val_every=10, patience=0)
    assert config.val_at_start  # the table entry's default
    history, dataset, flow = train_run(config)
    start = history.rows[0]
    assert start["step"] == 0 and all(r["val_nll"] > start["val_nll"] for r in history.rows[1:])
    assert history.best_step == 0
    val = evaluate(flow, dataset.val, seed=config.seed, device="cpu", reconstruction=False)
    assert val["nll"] == pytest.approx(start["val_nll"], abs=1e-6)


# -- data that cannot be modelled as given (issue 15, item 7) -----------------------------------------
def test_one_row_table_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="has 1 row.*at least 4"):
        load_table(_csv(tmp_path / "one.csv", np.array([[1.0, 2.0, 3.0]])))


def test_one_column_table_trains_with_the_default_recipe(tmp_path):
    from pushforward.runs import train_run

    table = np.random.default_rng(4).gamma(2.0, size=(80, 1))
    config = _config(_csv(tmp_path / "one_col.csv", table), tmp_path / "run", max_steps=30, val_every=10)
    history, _, _ = train_run(config)
    assert config.recipe == "tabular" and history.step == 30 and math.isfinite(history.best_val_nll)


def test_identical_rows_are_refused_and_constant_columns_dropped(tmp_path):
    with pytest.raises(ValueError, match="every column is constant"):
        load_table(_csv(tmp_path / "same.csv", np.tile([[1.0, 2.0, 3.0]], (20, 1))))
    table = np.c_[np.random.default_rng(5).normal(size=(30, 2)), np.full(30, 7.0)]
    with pytest.warns(ConstantColumnsWarning, match="dropped 1 constant column.*c2"):
        data = load_table(_csv(tmp_path / "const.csv", table))
    assert data.dim == 2 and data.dropped == ["c2"] and data.columns == ["c0", "c1"]


def test_huge_values_are_standardised_not_zeroed(tmp_path):
    rng = np.random.default_rng(6)
    table = np.c_[rng.normal(size=50) * 1e299 + 1e300, rng.normal(size=50)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_table(_csv(tmp_path / "huge.csv", table))
    assert float(data.train[:, 0].std(correction=0)) == pytest.approx(1.0, rel=1e-3)
    assert np.isfinite(data.std.numpy()).all() and math.isfinite(float(data.std.log().sum()))


# -- the benchmark script ----------------------------------------------------------------------------
def test_bench_tables_smoke(tmp_path, capsys):
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(REPO))
    from bench import tables

    methods = "pushforward,gaussian" + (",zuko-nsf" if _has("zuko") else "")
    tables.main(
        [
            "--tables",
            "wine",
            "--methods",
            methods,
            "--budget",
            "2",
            "--workers",
            "1",
            "--out",
            str(tmp_path / "rows.jsonl"),
        ]
    )
    text = capsys.readouterr().out
    assert "| wine | 178 x 13 |" in text and "Targets:" in text
    # a missing reader or missing data is an error that says how to get it
    missing = "pip install rdata" if not _has("rdata") else "fetch_tables.sh"
    with pytest.raises(SystemExit, match=missing):
        tables.load_table("Glass", str(tmp_path))


def test_bench_tables_pools_seeds_by_their_spread_and_pairs_differences():
    """Several seeds: the mean over seeds +- sd / sqrt(K) (not the rows' pooled s.e.), and differences
    paired seed by seed; one seed keeps its own s.e. over test rows."""
    sys.path.insert(0, str(REPO))
    from bench.tables import _difference, pooled

    def row(method, seed, nll, stderr=9.0):
        return {"table": "t", "method": method, "seed": seed, "nll": nll, "stderr": stderr, "steps": 10}

    rows = [row("pushforward", s, v) for s, v in enumerate([1.0, 2.0, 6.0])]
    rows += [row("zuko-nsf", s, v) for s, v in enumerate([2.0, 3.0, 7.5])]
    rows += [row("gaussian", 0, 4.0, stderr=0.5)]
    by = {r["method"]: r for r in pooled(rows)}
    assert by["pushforward"]["nll"] == pytest.approx(3.0)
    assert by["pushforward"]["stderr"] == pytest.approx(np.std([1.0, 2.0, 6.0], ddof=1) / math.sqrt(3))
    assert by["gaussian"]["stderr"] == 0.5 and by["gaussian"]["seeds"] == 1
    diff, se = _difference(by["pushforward"], by["zuko-nsf"])  # per seed -1, -1, -1.5
    assert diff == pytest.approx(-7 / 6)
    assert se == pytest.approx(np.std([-1.0, -1.0, -1.5], ddof=1) / math.sqrt(3))


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
