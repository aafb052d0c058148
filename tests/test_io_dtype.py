"""Saving and loading keep every tensor's dtype and bits: a float64 flow comes back float64, unrounded."""

from __future__ import annotations

import pytest
import torch
from registry import FAMILY_RECIPES

import pushforward as pf
from pushforward import models
from pushforward.checkpoint import load_checkpoint, save_checkpoint

_GLOW = {"shape": [1, 8, 8], "levels": 2, "steps": 1, "hidden_channels": 4}

# one small instance of every recipe (a new recipe must be added here: see the coverage test)
BUILDERS = {
    "nice": lambda: models.nice(4, layers=2, hidden=(8,)),
    "realnvp": lambda: models.realnvp(4, layers=2, hidden=(8,), context_features=3),
    "realnvp_image": lambda: models.realnvp_image((1, 8, 8), levels=2, hidden_channels=4, blocks=1),
    "glow": lambda: models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4),
    "maf": lambda: models.maf(4, layers=2, hidden=(8,)),
    "iaf": lambda: models.iaf(4, layers=2, hidden=(8,)),
    "nsf": lambda: models.nsf(4, layers=2, hidden=(8,), bins=4),
    "dequantized": lambda: models.dequantized({"recipe": "glow", "kwargs": _GLOW}, quantization_levels=16,
                                              layers=1, hidden_channels=4),
    "vae": lambda: models.RECIPES["vae"]((4,), latent=2, hidden=(8,)),
    "gaussian": lambda: models.gaussian(3),
    "tabular": lambda: models.tabular(3, layers=2, hidden=(8,), bins=4, context_features=3),
    **FAMILY_RECIPES,  # the later families (tests/registry_*.py)
}
DTYPES = [torch.float32, torch.float64]


def test_every_recipe_is_covered():
    assert set(models.RECIPES) <= set(BUILDERS), f"add {set(models.RECIPES) - set(BUILDERS)} to BUILDERS"


def _inputs(flow, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(5, *flow.event_shape, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(dtype)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype) if flow.recipe["kwargs"].get(
        "context_features") else None
    return x, c


def _log_prob(flow, x, c):
    torch.manual_seed(3)  # the VAE's bound samples its latent
    with torch.no_grad():
        return flow.log_prob(x, c)


def _trained_looking(name, dtype):
    """A flow in ``dtype`` whose every floating tensor holds values that float32 cannot represent
    (float64 noise added after the data-dependent init), so any rounding shows."""
    torch.manual_seed(0)
    flow = BUILDERS[name]().to(dtype)
    x, c = _inputs(flow, dtype)
    _log_prob(flow, x, c)  # ActNorm's data-dependent initialisation
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in flow.state_dict().values():
            if t.is_floating_point():
                t.add_((0.01 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(dtype))
    return flow


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_save_load_is_bit_exact_in_every_dtype(name, dtype, tmp_path):
    flow = _trained_looking(name, dtype)
    path = tmp_path / "flow.safetensors"
    pf.save(flow, path)
    loaded = pf.load(path)
    assert loaded.dtype == dtype
    saved, back = flow.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for key, value in saved.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key  # bit-exact, not merely close
    # non-persistent buffers (the dtype of samples) follow too
    assert [b.dtype for b in loaded.buffers()] == [b.dtype for b in flow.buffers()]
    x, c = _inputs(flow, dtype)
    a, b = _log_prob(flow, x, c), _log_prob(loaded, x, c)
    assert b.dtype == dtype
    assert torch.equal(a, b)


def test_mixed_precision_flow_keeps_each_tensor_dtype(tmp_path):
    flow = _trained_looking("realnvp", torch.float64)
    flow.transform.transforms[0].float()  # one layer in float32, the rest float64
    path = tmp_path / "mixed.safetensors"
    pf.save(flow, path)
    loaded = pf.load(path)
    for (key, value), back in zip(flow.state_dict().items(), loaded.state_dict().values()):
        assert back.dtype == value.dtype and torch.equal(back, value), key


def test_integer_dtype_mismatch_is_an_error(tmp_path):
    import json

    import safetensors.torch as st

    flow = BUILDERS["glow"]()
    path = tmp_path / "f.safetensors"
    pf.save(flow, path)
    state = st.load_file(str(path))
    key = next(k for k, v in state.items() if not v.is_floating_point())  # ActNorm's flag
    state[key] = state[key].to(torch.uint8)
    st.save_file(state, str(path), metadata={"pushforward_recipe": json.dumps(flow.recipe)})
    with pytest.raises(ValueError, match="uint8"):
        pf.load(path)


def test_checkpoint_refuses_to_cast_and_restores_float64_exactly(tmp_path):
    flow = _trained_looking("glow", torch.float64)
    opt = torch.optim.Adam(flow.parameters())
    save_checkpoint(tmp_path, flow, opt, {"step": 1})
    wrong = BUILDERS["glow"]()  # float32
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tmp_path, wrong, restore_rng=False)
    right = BUILDERS["glow"]().double()
    load_checkpoint(tmp_path, right, torch.optim.Adam(right.parameters()), restore_rng=False)
    for (key, value), back in zip(flow.state_dict().items(), right.state_dict().values()):
        assert back.dtype == value.dtype and torch.equal(back, value), key
    # the checkpoint's model file is a flow file too
    loaded = pf.load(tmp_path / "checkpoint" / "model.safetensors")
    assert loaded.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), flow.state_dict().values()))


def test_resumed_float64_run_restores_unrounded_best_weights(tmp_path):
    """``fit`` resumes a float64 run with the best weights read back from ``best.safetensors``:
    they must be the float64 weights, not float32-rounded ones."""
    from pushforward.config import config_from_dict
    from pushforward.data.toy import toy_sample
    from pushforward.train import fit

    train, val = toy_sample("moons", 256, seed=0).double(), toy_sample("moons", 128, seed=1).double()
    config = config_from_dict({"data": "moons", "batch_size": 64, "lr": 1e-3, "warmup_steps": 1,
                               "max_steps": 4, "val_every": 2, "patience": 0, "progress": False, "seed": 3,
                               "run_dir": str(tmp_path / "run")})

    def flow():
        torch.manual_seed(0)
        return models.realnvp(2, layers=2, hidden=(8,)).double()

    first = flow()
    fit(first, train, val, config)
    again = flow()
    history = fit(again, train, val, config, resume=True)  # nothing left to train: restores the best weights
    assert history.stop_reason == "completed"
    for (key, value), back in zip(first.state_dict().items(), again.state_dict().values()):
        assert back.dtype == value.dtype == torch.float64 or not value.is_floating_point(), key
        assert torch.equal(back, value), key


# the argument names as files written before their renames record them: {recipe: {new name: old name}}
_FORMER = {"realnvp": {"scale_bound": "bound"}, "realnvp_image": {"scale_bound": "bound"},
           "glow": {"scale_bound": "bound"}, "maf": {"scale_bound": "bound"}, "iaf": {"scale_bound": "bound"},
           "nsf": {"tail_bound": "bound"}, "dequantized": {"quantization_levels": "levels"}}


def _as_formerly_written(recipe: dict) -> dict:
    names = _FORMER.get(recipe["recipe"], {})
    kwargs = {names.get(k, k): v for k, v in recipe["kwargs"].items()}
    if isinstance(kwargs.get("flow"), dict):
        kwargs["flow"] = _as_formerly_written(kwargs["flow"])
    return {**recipe, "kwargs": kwargs}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_files_with_the_former_record_and_argument_names_still_load(name, tmp_path):
    """Files record ``pushforward_recipe``; they recorded ``pushforward_config`` with ``bound`` (now
    ``scale_bound`` / ``tail_bound``) and the dequantizer's ``levels`` (now ``quantization_levels``)."""
    import json

    import safetensors.torch as st

    recipe = BUILDERS[name]().recipe
    for new in _FORMER.get(name, {}):
        recipe["kwargs"][new] += 1  # not the default, so the recorded value must come through
    torch.manual_seed(0)
    flow = models.build(recipe)
    _log_prob(flow, *_inputs(flow, torch.float32))  # ActNorm's initialisation
    path = tmp_path / "f.safetensors"
    pf.save(flow, path)
    with st.safe_open(str(path), framework="pt") as f:
        assert set(f.metadata()) == {"pushforward_recipe", "pushforward_sha256"}
    old = _as_formerly_written(flow.recipe)
    if name in _FORMER:
        assert old != flow.recipe
    st.save_file(st.load_file(str(path)), str(path), metadata={"pushforward_config": json.dumps(old)})
    loaded = pf.load(path)
    assert loaded.recipe == flow.recipe
    x, c = _inputs(flow, torch.float32)
    torch.testing.assert_close(_log_prob(loaded, x, c), _log_prob(flow, x, c), atol=0, rtol=0)

