"""Tests for pushforward.data (toy, tabular, images) and pushforward.metrics."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pushforward.data import (
    FASHION_MNIST_ROOT,
    TOY_DENSITIES,
    ImageData,
    dequantize,
    load_digits,
    load_fashion_mnist,
    load_idx_dir,
    load_table,
    read_idx,
    split_off,
    toy_entropy,
    toy_log_prob,
    toy_sample,
)
from pushforward.metrics import bits_per_dim, mean_and_stderr

# ----------------------------------------------------------------------------- toy


@pytest.mark.parametrize("name", TOY_DENSITIES)
def test_toy_shape_dtype_and_seed(name: str) -> None:
    a = toy_sample(name, 500, seed=3)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, toy_sample(name, 500, seed=3))
    assert not torch.equal(a, toy_sample(name, 500, seed=4))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(toy_sample(name, 50, generator=g1), toy_sample(name, 50, generator=g2))
    assert a.abs().max() < 8  # everything lives on roughly [-4, 4]^2
    assert toy_sample(name, 0, seed=0).shape == (0, 2)


def test_toy_errors() -> None:
    with pytest.raises(ValueError, match="valid names are: moons, circles"):
        toy_sample("banana", 10)
    with pytest.raises(ValueError, match="unknown toy density"):
        toy_entropy("banana")
    with pytest.raises(ValueError, match="either seed or generator"):
        toy_sample("moons", 10, seed=1, generator=torch.Generator())
    with pytest.raises(NotImplementedError):
        toy_log_prob("pinwheel", torch.zeros(1, 2))


def test_checkerboard_samples_on_black_squares() -> None:
    x = toy_sample("checkerboard", 20_000, seed=0).double()
    assert (x >= -4).all() and (x <= 4).all()
    cell = torch.floor((x + 4) / 2).long()
    assert ((cell.sum(dim=1) % 2) == 0).all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    assert (counts > 0).sum() == 8  # all 8 black squares are used
    assert torch.allclose(toy_log_prob("checkerboard", x), torch.tensor(-math.log(32.0), dtype=torch.float64))
    off = torch.tensor([[-3.0, -1.0], [5.0, 0.0]])  # a white square, outside the board
    assert torch.isinf(toy_log_prob("checkerboard", off)).all()


def test_toy_entropy_closed_form_and_unknown() -> None:
    assert toy_entropy("checkerboard") == math.log(32.0)
    assert toy_entropy("pinwheel") is None


def test_moons_are_centred_and_log_prob_normalised() -> None:
    x = toy_sample("moons", 20_000, seed=0)
    assert x.mean(dim=0).abs().max() < 0.05
    h = 0.08  # Riemann sum of the exact density over a grid covering the support
    axes = [torch.arange(-4.5, 4.5, h, dtype=torch.float64), torch.arange(-3.0, 3.0, h, dtype=torch.float64)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    assert toy_log_prob("moons", grid).exp().sum().item() * h * h == pytest.approx(1.0, abs=1e-6)


def test_8gaussians_entropy_matches_monte_carlo() -> None:
    h = toy_entropy("8gaussians")
    assert h is not None
    # Well-separated components: close to log 8 + entropy of one gaussian (std sqrt(2)/4).
    assert h == pytest.approx(math.log(8) + 1 + math.log(2 * math.pi / 8), abs=0.01)
    nll = -toy_log_prob("8gaussians", toy_sample("8gaussians", 40_000, seed=11))
    mean, se = mean_and_stderr(nll)
    assert abs(mean - h) < 4 * se


# ----------------------------------------------------------------------------- tabular


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    rows = np.arange(30, dtype=np.float64).reshape(10, 3)
    plain, headed = tmp_path / "plain.csv", tmp_path / "headed.csv"
    np.savetxt(plain, rows, delimiter=",")
    np.savetxt(headed, rows, delimiter=",", header="a,b,c", comments="")
    a = load_table(plain, standardize=False)
    b = load_table(headed, standardize=False)
    assert a.train.dtype == torch.float32 and a.dim == 3
    assert (len(a.train), len(a.val), len(a.test)) == (8, 1, 1)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part), getattr(b, part))
    together = torch.cat([a.train, a.val, a.test])
    assert torch.equal(together[together[:, 0].argsort()], torch.from_numpy(rows).float())


def test_whitespace_and_semicolon_csv(tmp_path: Path) -> None:
    (tmp_path / "ws.txt").write_text("1 2\n3 4\n5 6\n")
    (tmp_path / "sc.csv").write_text("# comment\nx;y\n1;2\n3;4\n5;6\n")
    for name in ("ws.txt", "sc.csv"):
        d = load_table(tmp_path / name, split=(1.0, 0.0, 0.0), standardize=False)
        assert sorted(d.train[:, 1].tolist()) == [2.0, 4.0, 6.0]


def test_npy_npz_and_split_sizes(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(101, 4))
    np.save(tmp_path / "d.npy", data)
    np.savez(tmp_path / "d.npz", other=np.zeros(3), x=data)
    np.savez(tmp_path / "first.npz", data[:, :2])
    a = load_table(tmp_path / "d.npy", split=(0.6, 0.2, 0.2), seed=5)
    b = load_table(tmp_path / "d.npz", split=(0.6, 0.2, 0.2), seed=5)
    assert (len(a.train), len(a.val), len(a.test)) == (61, 20, 20)
    assert torch.equal(a.test, b.test)
    assert load_table(tmp_path / "first.npz").dim == 2
    c = load_table(tmp_path / "d.npy", split=(0.6, 0.2, 0.2), seed=6)
    assert not torch.equal(a.test, c.test)
    with pytest.raises(ValueError, match="split"):
        load_table(tmp_path / "d.npy", split=(0.5, 0.2, 0.2))


def test_standardisation_uses_train_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(loc=[1.0, -2.0, 5.0], scale=[2.0, 0.5, 1.0], size=(200, 3))
    train[:, 2] = 5.0  # constant column: only centred
    val, test = train[:20] + 10.0, train[:20] * 3.0
    for name, arr in (("tr", train), ("va", val), ("te", test)):
        np.save(tmp_path / f"{name}.npy", arr)
    d = load_table(train=tmp_path / "tr.npy", val=tmp_path / "va.npy", test=tmp_path / "te.npy",
                   drop_constant=False)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[2] = 1.0
    assert torch.allclose(d.mean.double(), torch.from_numpy(mean), atol=1e-6)
    assert torch.allclose(d.std.double(), torch.from_numpy(std), atol=1e-6)
    assert torch.allclose(d.train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d.val, torch.from_numpy((val - mean) / std).float(), atol=1e-5)
    assert torch.allclose(d.test, torch.from_numpy((test - mean) / std).float(), atol=1e-5)
    assert torch.allclose(d.unstandardize(d.val).double(), torch.from_numpy(val), atol=1e-4)
    with pytest.raises(ValueError, match="all three"):
        load_table(train=tmp_path / "tr.npy", val=tmp_path / "va.npy")


def test_table_errors_name_file_row_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n4,oops,6\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3 \(data row 2\), column 2 \('b'\).*'oops'"):
        load_table(bad)
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n")
    with pytest.raises(ValueError, match=r"nan\.csv: line 2 \(data row 2\), column 2.*'nan'"):
        load_table(tmp_path / "nan.csv")
    (tmp_path / "empty.csv").write_text("1,2\n3,\n")
    with pytest.raises(ValueError, match="empty cell"):
        load_table(tmp_path / "empty.csv")
    (tmp_path / "ragged.csv").write_text("1,2\n3,4,5\n")
    with pytest.raises(ValueError, match="line 2 has 3 columns, expected 2"):
        load_table(tmp_path / "ragged.csv")
    arr = np.ones((5, 3))
    arr[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    with pytest.raises(ValueError, match=r"nan\.npy: row 3, column 1 \(0-based\).*nan"):
        load_table(tmp_path / "nan.npy")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_table(tmp_path / "missing.csv")


# ----------------------------------------------------------------------------- images


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    """Independent IDX writer: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    blob = struct.pack(">BBBB", 0, 0, code, array.ndim)
    blob += b"".join(struct.pack(">I", d) for d in array.shape) + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    path = tmp_path / "imgs"  # no extension: gzip is detected from the magic bytes
    _write_idx(path, images, compress=compress)
    out = read_idx(path)
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    shorts = np.array([[-3, 1000], [7, -32000]], dtype=np.int16)
    _write_idx(tmp_path / "s", shorts, code=0x0B, compress=compress)
    assert np.array_equal(read_idx(tmp_path / "s"), shorts)


def test_idx_errors(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="unknown IDX data type code 0x07"):
        read_idx(tmp_path / "code")
    _write_idx(tmp_path / "short", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def test_load_idx_dir_and_split_off(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8), np.arange(12) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, compress=True)
    data = load_idx_dir(tmp_path, "test")
    assert data.images.shape == (12, 1, 6, 5) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert data.levels == 256 and data.dims == 30
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx_dir(tmp_path, "train")
    rest, val = split_off(data, 3, seed=0)
    assert (len(rest), len(val)) == (9, 3)
    assert sorted(rest.labels.tolist() + val.labels.tolist()) == sorted(labels.tolist())
    assert torch.equal(split_off(data, 3, seed=0)[1].images, val.images)


def test_dequantize() -> None:
    x = torch.tensor([[0, 1, 255], [255, 128, 0]], dtype=torch.uint8)
    y = dequantize(x, 256, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y >= 0).all() and (y < 1).all()
    assert torch.equal(torch.floor(y * 256).long(), x.long())
    big = torch.full((100_000,), 255, dtype=torch.int64)
    assert (dequantize(big, 256) < 1).all()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(dequantize(x, 256, g1), dequantize(x, 256, g2))
    with pytest.raises(ValueError, match=r"\[0, 16\].*\[0, 17\]"):
        dequantize(torch.tensor([0, 17]), 17)
    with pytest.raises(ValueError, match="found"):
        dequantize(torch.tensor([-1, 3]), 17)
    with pytest.raises(TypeError, match="integer tensor"):
        dequantize(torch.tensor([0.5]), 256)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist() -> None:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.levels == 256 and test.levels == 256
    assert train.labels.shape == (60000,) and set(train.labels.unique().tolist()) == set(range(10))


def test_fashion_mnist_missing_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_digits() -> None:
    pytest.importorskip("sklearn")
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and int(data.images.max()) == 16
    assert data.levels == 17 and data.labels.dtype == torch.int64
    parts = [load_digits(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1437, 180, 180]
    assert torch.equal(load_digits("val").images, parts[1].images)  # fixed split
    assert isinstance(dequantize(parts[0].images, parts[0].levels), torch.Tensor)


def test_image_data_validates_shapes() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        ImageData(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), 256)


# ----------------------------------------------------------------------------- metrics


def test_bits_per_dim_by_hand() -> None:
    # Uniform density on [0, 1]^D: NLL(y) = 0, so bits/dim = log2(levels) = 8 for 256 levels.
    assert bits_per_dim(0.0, dims=784, levels=256) == pytest.approx(8.0, abs=1e-12)
    # D = 2, levels = 4, NLL = 1 nat: (1 + 2 ln 4) / (2 ln 2) = 2 + 1 / (2 ln 2) = 2.72134752...
    assert bits_per_dim(1.0, dims=2, levels=4) == pytest.approx(2.7213475204444817, abs=1e-12)
    # Binary data, D = 1, P(x=0) = 1/4: the piecewise-constant density p(y) = 1/2 on [0, 1/2)
    # gives NLL(y) = ln 2 for x = 0; the bound is tight here: -log2(1/4) = 2 bits.
    assert bits_per_dim(math.log(2.0), dims=1, levels=2) == pytest.approx(2.0, abs=1e-12)
    t = bits_per_dim(torch.tensor([0.0, 1.0]), dims=2, levels=4)
    assert isinstance(t, torch.Tensor)
    assert torch.allclose(t, torch.tensor([2.0, 2.7213475204444817]))


def test_mean_and_stderr() -> None:
    mean, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0)  # sample var 5/3, n = 4
    assert math.isnan(mean_and_stderr([3.0])[1])
    with pytest.raises(ValueError):
        mean_and_stderr(torch.tensor([]))


# ----------------------------------------------------------------------------- the registry


def test_registry_holds_every_toy_density_with_its_true_density() -> None:
    from pushforward.data import entries, lookup, names

    assert names("toy2d") == list(TOY_DENSITIES)
    for name in TOY_DENSITIES:
        entry = lookup(name)
        assert entry.kind == "toy2d" and entry.recipe == "realnvp" and entry.help
        assert (entry.log_prob is None) == (name == "pinwheel")
    x = toy_sample("moons", 5, seed=0)
    assert torch.equal(lookup("moons").log_prob(x), toy_log_prob("moons", x))
    assert lookup("checkerboard").entropy() == pytest.approx(math.log(32))
    images = {e.name: e for e in entries() if e.kind == "image"}
    assert (images["digits"].levels, images["digits"].classes) == (17, 10)
    assert (images["fashion-mnist"].levels, images["fashion-mnist"].classes) == (256, 10)


def test_registry_lookup_of_names_files_and_directories(tmp_path: Path) -> None:
    from pushforward.data import lookup

    assert lookup("digits").name == "digits"
    assert lookup("some/where/table.CSV").name == "table"  # by suffix, before the file exists
    (tmp_path / "rows").write_text("1,2\n3,4\n")
    assert lookup(str(tmp_path / "rows")).name == "table"  # an existing file of any name
    assert lookup(str(tmp_path)).name == "idx"  # a directory: IDX images
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist': use one of moons, .*digits.*FILE\.csv"):
        lookup("mnist")
    assert lookup.__module__ == "pushforward.data.registry"


def test_register_validates_and_unregister_cleans_up() -> None:
    from pushforward.data import Dataset, lookup, names, register, unregister

    def load(config):
        return Dataset("x", "table", torch.zeros(4, 1), torch.zeros(2, 1), torch.zeros(2, 1), (1,))

    with pytest.raises(ValueError, match="already registered"):
        register("moons", kind="toy2d", load=load, help="again", recipe="realnvp")
    with pytest.raises(ValueError, match="kind must be one of toy2d, image, table"):
        register("odd", kind="graph", load=load, help="h", recipe="realnvp")
    with pytest.raises(ValueError, match="grey levels"):
        register("pics", kind="image", load=load, help="h", recipe="glow")
    with pytest.raises(ValueError, match="one non-empty word"):
        register("two words", kind="table", load=load, help="h", recipe="nsf")
    models = {"nsf": {"hidden": [4]}}
    entry = register("tiny-table", kind="table", load=load, help="a tiny table", recipe="nsf", models=models)
    try:
        models["nsf"]["hidden"].append(5)  # the entry keeps its own copy
        assert lookup("tiny-table") is entry and entry.models["nsf"]["hidden"] == [4]
        assert "tiny-table" in names("table") and "tiny-table" not in names("toy2d")
        from pushforward.config import resolve_config

        config = resolve_config({}, {"data": "tiny-table", "model": {"layers": 1}})
        assert config.recipe == "nsf" and config.model == {"hidden": [4], "layers": 1}
        config.model["hidden"].append(6)  # nor does a config share the registry's lists
        assert entry.models["nsf"]["hidden"] == [4]
    finally:
        unregister("tiny-table")
    with pytest.raises(ValueError, match="unknown dataset"):
        lookup("tiny-table")
    broken = register("broken", kind="table", load=load, help="h", recipe="nsf", settings={"batch_sise": 4})
    try:
        from pushforward.config import resolve_config

        with pytest.raises(ValueError, match="registered defaults of data set 'broken'.*'batch_sise'"):
            resolve_config({}, {"data": "broken"})
    finally:
        assert unregister("broken") is broken


def test_idx_directory_splits(tmp_path: Path) -> None:
    from pushforward.config import resolve_config
    from pushforward.experiment import load_dataset

    rng = np.random.default_rng(1)
    for split, n in (("train", 20), ("t10k", 6)):
        images = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    config = resolve_config({}, {"data": str(tmp_path), "val_fraction": 0.25, "seed": 3})
    assert config.recipe == "glow" and config.model["hidden_channels"] == 64
    ds = load_dataset(config)
    assert (ds.name, ds.kind, ds.levels, ds.event_shape) == (tmp_path.name, "image", 256, (1, 4, 4))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 6)
    again = load_dataset(config)
    assert torch.equal(again.val.images, ds.val.images)  # seeded
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset(resolve_config({}, {"data": str(tmp_path / "..")}))
