"""Registry entries of the variational family: transform cases (test_transforms.py) and small recipe
instances (saved and loaded bit-exactly by test_io_dtype.py; compiled with fullgraph by test_compile.py when
listed in COMPILE).

Residual blocks are registered with ``estimator=None`` (the exact log-determinant in both modes): the
Russian-roulette estimate is random, so it cannot equal the autograd Jacobian's; tests/test_residual.py
checks that it is unbiased. The numerical inverses (planar, Sylvester, residual) are exact to float64
precision, so the round trip holds at the registry's 1e-9 like the analytic ones. ``residual`` is not in
COMPILE: its inverse iterates to a tolerance (data-dependent loop) and its training-mode estimate draws a
random number of terms; tests/test_residual.py compiles its explicit direction.
"""

from __future__ import annotations

from collections.abc import Callable

from registry_types import Case

from pushforward import Inverse, models
from pushforward.transforms import Planar, Radial, ResidualBlock, Sylvester

V = 5

CASES: dict[str, Case] = {
    "planar": Case(lambda: Planar(V), (V,)),
    "planar_inverted": Case(lambda: Inverse(Planar(V)), (V,)),
    "planar_context": Case(lambda: Planar(V, context_features=3), (V,), context=3),
    "radial": Case(lambda: Radial(V), (V,)),
    "radial_inverted": Case(lambda: Inverse(Radial(V)), (V,)),
    "radial_context": Case(lambda: Radial(V, context_features=3), (V,), context=3),
    "sylvester_triangular": Case(lambda: Sylvester(V), (V,)),
    "sylvester_householder": Case(lambda: Sylvester(V, reflections=3), (V,)),
    "sylvester_inverted": Case(lambda: Inverse(Sylvester(V, reflections=2)), (V,)),
    "sylvester_context": Case(lambda: Sylvester(V, reflections=2, context_features=3), (V,), context=3),
    "residual_block": Case(lambda: ResidualBlock(V, hidden=(16, 16)), (V,)),
    "residual_block_inverted": Case(lambda: Inverse(ResidualBlock(V, hidden=(16,))), (V,)),
    "residual_block_context": Case(lambda: ResidualBlock(V, hidden=(16,), context_features=3), (V,),
                                   context=3),
    "residual_block_linear": Case(lambda: ResidualBlock(V, hidden=()), (V,)),
    "planar_recipe": Case(lambda: models.planar(V, layers=3).transform, (V,)),
    "radial_recipe": Case(lambda: models.radial(V, layers=3).transform, (V,)),
    "sylvester_recipe": Case(lambda: models.sylvester(V, layers=3).transform, (V,)),
    "sylvester_recipe_context": Case(lambda: models.sylvester(V, layers=2, reflections=2,
                                                              context_features=3).transform, (V,), context=3),
    "residual_recipe_exact": Case(
        lambda: models.residual(V, blocks=2, hidden=(16,), train_logdet="exact").transform, (V,)),
    "residual_recipe_variational": Case(
        lambda: models.residual(V, blocks=2, hidden=(16,), train_logdet="exact", variational=True).transform,
        (V,)),
}

RECIPES: dict[str, Callable] = {
    "planar": lambda: models.planar(4, layers=3, context_features=3),
    "radial": lambda: models.radial(4, layers=3),
    "sylvester": lambda: models.sylvester(4, layers=2, reflections=2),
    "residual": lambda: models.residual(4, blocks=2, hidden=(8,)),
}

COMPILE: dict[str, Callable] = {
    "planar": lambda: models.planar(4, layers=2),
    "planar_context": lambda: models.planar(2, layers=2, context_features=3),
    "radial": lambda: models.radial(4, layers=2),
    "sylvester": lambda: models.sylvester(4, layers=1),  # one layer: tracing unrolls its bisections
    "sylvester_householder": lambda: models.sylvester(4, layers=1, reflections=2),
}
