"""Registry entries of the continuous family: transform cases (test_transforms.py) and small recipe
instances (saved and loaded bit-exactly by test_io_dtype.py; compiled with fullgraph by test_compile.py when
listed in COMPILE).

Tolerances. A CNF is exact only up to its ODE solver: the registry checks the round trip to 1e-9 and the
ladj against ``slogdet`` of the autograd Jacobian to 1e-8, in float64. The autograd Jacobian is that of the
*discretised* map (the solver's steps), and the ladj is the solver's integral of the divergence along the
same steps; both differ from the exact flow, and the inverse (a separate solve backwards in time) differs
from the forward, by the solver's error. So the cases use solvers whose error lies far below those
tolerances: dopri5 at rtol = atol = 1e-12 (measured: round trip ~6e-12, ladj vs Jacobian ~2e-12 on these
fields) and fixed-step rk4 with 100 steps (round trip ~3e-11, ladj vs Jacobian ~2e-12; rk4's error is
O(h^4)). With a loose solver (dopri5 at 1e-5, the recipes' default) the same checks fail, as they should:
test_continuous.py shows it. No case uses Hutchinson's estimator, whose ladj is an estimate (it is tested
for unbiasedness in test_continuous.py); every case is exact in training and evaluation mode alike.

COMPILE is empty: torchdiffeq's solvers branch on tensor values (adaptive step control, the fixed-step
grid's loop), which torch.compile cannot capture in one graph.
"""

from __future__ import annotations

from collections.abc import Callable

from registry_types import Case

from pushforward import models
from pushforward.transforms.continuous import CNF, ConvVectorField, MLPVectorField

V = 5
IMG = (2, 2, 2)  # small: the Jacobian checks cost D backward passes through the whole solve
TIGHT = {"method": "dopri5", "rtol": 1e-12, "atol": 1e-12}
RK4 = {"method": "rk4", "step_size": 0.01}


CASES: dict[str, Case] = {
    "cnf_rk4_context": Case(lambda: CNF(MLPVectorField(V, (8,), 3), **RK4), (V,), context=3),
    "cnf_conv_context": Case(lambda: CNF(ConvVectorField(IMG, 4, blocks=0, context_features=3), 3, **TIGHT),
                             IMG, context=3),
    "cnf_recipe": Case(lambda: models.cnf(V, hidden=(8,), rtol=1e-12, atol=1e-12).transform, (V,)),
}
RECIPES: dict[str, Callable] = {
    "cnf": lambda: models.cnf(3, hidden=(8,), context_features=3),
    "cnf_image": lambda: models.cnf_image((1, 4, 4), hidden_channels=4, blocks=1),
}
COMPILE: dict[str, Callable] = {}
