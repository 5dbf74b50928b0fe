"""trim_scope: model — each model's share of the global top k, per tensor."""
from types import SimpleNamespace

import torch

from mergekit_ops.methods.model_trim import plan_model_trim


def test_every_model_gets_its_own_global_top_k_split_per_tensor(seed):
    shapes = [(7, 5), (30,), (12, 10), (3, 4, 5)]
    densities = [0.3, 0.6]
    base = [torch.randn(s) for s in shapes]
    models = [[b + torch.randn(s) for b, s in zip(base, shapes)] for _ in densities]
    tasks = [SimpleNamespace(name=f"t{j}", copy=False, shape=s, params={"trim_scope": "model"},
                             inputs=[(i, f"t{j}") for i in range(len(densities))],
                             model_params=[{"density": d} for d in densities]) for j, s in enumerate(shapes)]
    extras = plan_model_trim(tasks, lambda t: ([m[int(t.name[1:])] for m in models], base[int(t.name[1:])]), "r.yml")
    for i, d in enumerate(densities):
        deltas = [(x - b).abs().reshape(-1) for x, b in zip(models[i], base)]
        everything = torch.cat(deltas)
        k = int(d * everything.numel())
        threshold = everything.sort(descending=True).values[k - 1]  # float32 random: no ties
        want = [int((delta >= threshold).sum()) for delta in deltas]
        assert [extras[t.name]["trim_k"][i] for t in tasks] == want
        assert sum(want) == k
