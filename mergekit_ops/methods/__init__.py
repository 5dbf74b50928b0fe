"""The merge methods by their mergekit names: parameters, defaults and input contracts.

Declared here without importing torch, so recipes are checked cheaply (compose checks every
recipe on each `dvc repro`); each method's code is in its module, imported when it first merges.
"""
from __future__ import annotations

from dataclasses import replace

from .base import Method, Param, in_range

WEIGHT = Param("weight", kind=float)


def _check_linear(params: dict, model_params: list[dict]) -> str | None:
    if params["normalize"] and abs(sum(p["weight"] for p in model_params)) < 1e-8:
        return "the weights sum to 0, so normalize would divide by zero (set normalize: false)"
    return None


# the generalized task-arithmetic family (task_arithmetic.py): mergekit 0.1.5's defaults per member
RESCALE = Param("rescale", kind=str, choices=("l1", "inverse_density", "none"),
                aliases=((True, "l1"), (False, "none")))
DENSITY = Param("density", 1.0, float, check=in_range(0.0, 1.0, lo_open=True))
GAMMA = Param("gamma", 0.01, float, check=in_range(0.0, 1.0))
EPSILON = Param("epsilon", 0.15, float, check=in_range(0.0, 1.0))


def _check_epsilon(params: dict, model_params: list[dict]) -> str | None:
    for p in model_params:
        d, e = p["density"], p["epsilon"]
        if d < 1 and not (0 < d - e and d + e < 1):
            return f"della needs 0 < density - epsilon and density + epsilon < 1, got density {d}, epsilon {e}"
    return None


# ram, ramplus_tl: the delta below which a model does not count as changing an entry
RAM_EPSILON = Param("epsilon", 1e-5, float)


def _family(name: str, normalize: bool, rescale: str, extra=(), scoped=False, seeded=False, doc="") -> Method:
    params = (Param("lambda", 1.0, float), Param("int8_mask", False, bool), Param("normalize", normalize, bool),
              replace(RESCALE, default=rescale))
    if scoped:
        params += (Param("trim_scope", "tensor", str, choices=("tensor", "model")),)
    return Method(
        name, f"task_arithmetic:merge_{name}",
        params=params, model_params=(WEIGHT, DENSITY) + extra,
        base="required", min_models=1, doc=doc,
        check=_check_epsilon if EPSILON in extra else None,
        preparation="model_trim:plan_model_trim" if scoped else None, seeded=seeded,
    )


_ALL = [
    Method("linear", "linear:merge_linear",
           params=(Param("normalize", True, bool),), model_params=(WEIGHT,),
           base="input", min_models=1, check=_check_linear,
           doc="Weighted average of the models (model soups)."),
    Method("slerp", "slerp:merge_slerp",
           params=(Param("t", kind=float, check=in_range(0.0, 1.0)),),
           base="required", min_models=1, max_models=1,
           doc="Spherical interpolation of two models; t=0 gives the base, t=1 the other."),
    Method("nearswap", "nearswap:merge_nearswap",
           params=(Param("t", kind=float),),
           base="required", min_models=1, max_models=1,
           doc="Interpolate towards the other model by clamp(t / |base - x|, 0, 1) per element."),
    Method("passthrough", "passthrough:merge_passthrough",
           model_params=(Param("scale", None, float),),
           base="input", min_models=1, max_models=1,
           doc="Copy the single source's tensors, optionally scaled; with slices, stacks layer ranges."),
    Method("model_stock", "model_stock:merge_model_stock",
           params=(Param("filter_wise", False, bool),),
           base="required", min_models=2,
           doc="Model Stock: interpolate from the base towards the mean of the models by their agreement."),
    Method("sce", "sce:merge_sce",
           params=(Param("select_topk", 1.0, float, check=in_range(0.0, 1.0)), Param("int8_mask", False, bool)),
           base="required", min_models=1,
           doc="SCE: keep the select_topk share of highest-variance positions, energy weights, TIES sign mask."),
    Method("ram", "ram:merge_ram",
           params=(RAM_EPSILON,), base="required", min_models=1,
           doc="RAM: per entry, the mean of the deltas larger than epsilon (one model's alone is kept whole)."),
    Method("ramplus_tl", "ram:merge_ramplus_tl",
           params=(Param("r", 0.1, float), Param("alpha", 0.2, float), RAM_EPSILON),
           base="required", min_models=1,
           doc="RAM+ (tensor-local): ram, with each model's unique deltas scaled by "
               "1 + r * clip(shared / unique, 0, alpha)."),
    Method("arcee_fusion", "arcee_fusion:merge_arcee_fusion",
           base="required", min_models=1, max_models=1,
           doc="Keep the other model's changes whose |delta| * row KL of the softmaxes is >= median + 1.5 IQR."),
    Method("nuslerp", "spherical:merge_nuslerp",
           params=(Param("nuslerp_flatten", True, bool), Param("nuslerp_row_wise", False, bool)),
           model_params=(WEIGHT,), base="optional", min_models=2, max_models=2,
           doc="Slerp of two models (or their task vectors over a base) at t = w1 / (w0 + w1)."),
    Method("multislerp", "spherical:merge_multislerp",
           params=(Param("normalize_weights", True, bool), Param("eps", 1e-8, float)),
           model_params=(WEIGHT,), base="optional", min_models=1,
           doc="Weighted spherical mean of any number of models (task vectors with a base)."),
    Method("karcher", "spherical:merge_karcher",
           params=(Param("max_iter", 10, int), Param("tol", 1e-5, float)),
           base="input", min_models=1,
           doc="Karcher mean of the models on the sphere, equal weights."),
    _family("task_arithmetic", False, "none", doc="base + lambda * sum(w_i * (x_i - base))."),
    _family("ties", True, "none", scoped=True,
            doc="TIES: trim to the top `density` magnitudes, elect signs, disjoint mean."),
    _family("dare_linear", False, "l1", seeded=True,
            doc="DARE: random drop with keep probability `density`, rescale, weighted sum."),
    _family("dare_ties", False, "l1", seeded=True, doc="DARE drop + TIES sign election."),
    _family("breadcrumbs", False, "none", (GAMMA,),
            doc="Model Breadcrumbs: drop the largest `gamma` and smallest entries, keep `density`."),
    _family("breadcrumbs_ties", False, "none", (GAMMA,),
            doc="Breadcrumbs + TIES sign election."),
    _family("della", True, "l1", (EPSILON,), seeded=True,
            doc="DELLA: magnitude-ranked keep probabilities in [density-epsilon, density+epsilon], sign election."),
    _family("della_linear", False, "l1", (EPSILON,), seeded=True,
            doc="DELLA drop without sign election."),
]
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
