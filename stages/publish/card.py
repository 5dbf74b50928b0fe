"""The model card of a published merge: front matter the hub indexes (parents as `base_model` with
`base_model_relation: merge`, tags, license, model-index results) and a body that says how the
model was made and what it scored, with the report's pictures (and the search's, for a merge a
search found) copied into the repo beside it: `card_images` says which."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..common.errors import PublishError
from ..common.layout import card_images, model_dir, parents
from ..common.recipes import recipe_of, search_origin

ALT = {"images/scores.png": "the merge against its parents and base, per task",
       "images/retention.png": "retention per task", "images/trials.png": "the search: validation objective per trial"}


def hub_id(name: str, params: dict) -> str | None:
    """Where a model lives on the hub: a hub source's repo, or the repo a publish target sends a merge to."""
    if name in params["models"]:
        return params["models"][name].get("repo_id")
    return next((t["repo_id"] for t in sorted(params["publish"].values(), key=lambda t: t["repo_id"])
                 if t["model"] == name), None)


def license_of(name: str, params: dict) -> dict[str, str | None]:
    """{source model: its license} for every source model a model is made from."""
    if name in params["merges"]:
        found: dict[str, str | None] = {}
        for p in parents(name, params):
            found.update(license_of(p, params))
        return found
    model = params["models"][name]
    if model.get("license"):
        return {name: model["license"]}
    readme = model_dir(name, params) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        return {name: ModelCard.load(readme).data.to_dict().get("license")}
    return {name: None}


def inherited_license(name: str, params: dict) -> str:
    found = license_of(name, params)
    missing = sorted(m for m, lic in found.items() if not lic)
    if missing:
        raise PublishError(f"'{name}' is made from {', '.join(missing)} whose license is unknown: set `license:` "
                           f"in conf/models/{missing[0]}.yaml")
    distinct = sorted(set(found.values()))
    if len(distinct) > 1:
        held = "; ".join(f"{lic}: {', '.join(sorted(m for m in found if found[m] == lic))}" for lic in distinct)
        raise PublishError(f"'{name}' is made from models under different licenses ({held}); a merge cannot "
                           "inherit one license from them")
    return distinct[0]


def build_card(target: str, params: dict, comparison: dict, lineage: list[str], digests: dict[str, str]):
    """A huggingface_hub ModelCard for publish target `target`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    spec = params["publish"][target]
    name = spec["model"]
    recipe = recipe_of(name, params)
    results = [EvalResult(task_type="text-generation", dataset_type=f"{t['suite']}/{t['task']}",
                          dataset_name=f"{t['suite']}/{t['task']}", metric_type=t["kind"],
                          metric_value=round(t["scores"][name], 6))
               for t in comparison["tasks"] if t["scores"][name] is not None]
    data = ModelCardData(
        base_model=sorted(hub_id(p, params) or p for p in parents(name, params)),
        base_model_relation="merge", tags=["merge", "mergeforge", recipe["merge_method"]],
        library_name="transformers", license=inherited_license(name, params),
        model_name=spec["repo_id"].split("/")[1], eval_results=results or None)
    return ModelCard(_body(data, name, params, comparison, lineage, digests))


def _body(data, name: str, params: dict, comparison: dict, lineage: list[str], digests: dict[str, str]) -> str:
    from ..evaluate.report import markdown

    spec = params["merges"][name] | {"recipe": recipe_of(name, params)}
    ours = {"seed": spec["seed"]} if spec.get("seed") else {}
    ours |= {"device": spec["device"]} if spec["device"] != "cpu" else {}  # the last bits depend on it
    recipe = yaml.safe_dump(spec["recipe"] | ours, sort_keys=False)
    table = markdown(name, comparison).split("\n", 2)[2]  # without the report's own heading
    digest_rows = "\n".join(f"| {m} | `{d}` |" for m, d in sorted(digests.items()))
    return "\n".join([
        "---", data.to_yaml(), "---", "",
        f"# {data.model_name}", "",
        f"A `{spec['recipe']['merge_method']}` merge of {', '.join(f'`{p}`' for p in parents(name, params))}, "
        "built with mergeforge from the recipe below." + _found(name, params), "",
        "## Recipe", "", "```yaml", recipe.rstrip(), "```", "",
        "## Lineage", "", "```", *lineage, "```", "",
        "## Evaluation", "", table.rstrip(), "",
        *[f"![{name}: {ALT[rel]}]({rel})\n" for rel in card_images(name, params)],
        "## Content digests", "", "| model | sha256 of its files |", "|---|---|", digest_rows, "",
    ])


def _found(name: str, params: dict) -> str:
    origin = search_origin(name, params)
    if not origin:
        return ""
    return (f" The recipe was found by the search `{origin['search']}`: trial {origin['trial']}, the best of "
            f"{origin['trials']}, tuned on validation prompts (objective {origin['objective']:.4g}); the scores "
            "below are on test prompts no trial saw.")


def copy_images(name: str, params: dict, folder: Path) -> None:
    """Copy the card's pictures into the repo folder, where the card's links find them."""
    for rel, source in card_images(name, params).items():
        if not source.is_file():
            raise PublishError(f"{source}: missing, a picture the card of '{name}' shows; its report or search "
                               "stage draws it (`dvc repro`)")
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / rel)
