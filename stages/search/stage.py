"""search stage: run the Optuna study of conf/searches/NAME.yaml until its budget is spent, then
write what it found to artifacts/searches/NAME/:
  recipe.yaml  the best trial's recipe, plain mergekit YAML (the merge NAME is built from it)
  best.json    the best trial: its number, values, validation scores and objective (DVC metrics)
  trials.json  every finished trial: values, validation scores, objective, best so far (DVC
               plots: the objective per trial, and against each value)
  trials.png   the objective per trial and the best so far, as a picture (the model card shows it)
Trials are tuned on the validation split of the objective's suite only. Each trial is also a nested
MLflow run under the search's run, with its seconds: the one thing that differs between two runs
of a search, so it stays out of these files (the same search gives the same bytes).

    python -m stages.search NAME                run trials, wait for other workers, write the results
    python -m stages.search NAME --worker       only run trials (another worker on the same study)
    python -m stages.search NAME --submit N [--on slurm ...]
                                                N more workers through submitit (see workers.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mergekit_ops import MergeError, RecipeError

from ..common import pictures
from ..common.atomic import write_json, write_text
from ..common.errors import EvalError, LineageError, SearchError
from ..common.layout import search_files
from . import records
from .space import Space, parse_space
from .study import open_study, run_trials, wait_for_others
from .trials import Trials, recipe_for


def search(name: str, params: dict, root: Path, worker: bool = False) -> Path | int:
    """Run the study's trials; then (not a worker) wait for other workers and write the results.
    Returns the recipe file, or for a worker the number of trials it ran."""
    spec = params["searches"][name]
    space = parse_space(spec["recipe"], spec.get("constraints"), f"params.yaml: searches.{name}")
    study = open_study(name, spec, root)
    run = records.search_run(name, study.study_name)  # MLflow first: an unreachable store fails before any trial
    trials = Trials(name, spec, space, root / ".mergeforge" / "searches" / name)
    budget = spec["budget"].get("trials")

    def said(number: int) -> None:
        trials_now = study.get_trials(deepcopy=False)
        t = trials_now[number]
        records.log_trial(run, name, number, t.state.name.lower(), space.chosen(t.params),
                          t.user_attrs.get("scores", {}), t.value, t.user_attrs.get("seconds"))
        best = _best(study)
        finished = sum(x.state.name in ("COMPLETE", "PRUNED") for x in trials_now)
        where = f"trial {number} ({finished}" + (f"/{budget})" if budget else " finished)")
        value = f"pruned at {t.value:.4g}" if t.state.name == "PRUNED" else f"objective {t.value:.4g}"
        lead = f"best {best.value:.4g} (trial {best.number})" if best else "no best yet"
        mode = "in memory" if trials.in_memory else "through files"
        print(f"search {name}: {where}: {value}, {lead}, {t.user_attrs.get('seconds', 0):.1f} s {mode}",
              file=sys.stderr)

    ran = run_trials(study, spec, space, trials, said)
    if worker:
        return ran
    wait_for_others(study)
    out = write_results(name, params, study, space)
    best = _best(study)
    records.mark_best(run, name, best.number, best.value)
    return out


def _best(study):
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    if study.direction.name == "MINIMIZE":  # ties: the earliest trial
        return min(done, key=lambda t: (t.value, t.number))
    return max(done, key=lambda t: (t.value, -t.number))


def write_results(name: str, params: dict, study, space: Space) -> Path:
    """recipe.yaml, best.json, trials.json and trials.png from the study's finished trials."""
    from optuna.trial import TrialState

    spec = params["searches"][name]
    files = search_files(name, params)
    best = _best(study)
    if best is None:
        raise SearchError(f"search '{name}': no trial finished (see the errors above)")
    finished = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                      key=lambda t: t.number)
    suite, kind = spec["objective"]["suite"], spec["objective"]["data"]["kind"]
    rows, lead = [], None
    better = (lambda a, b: a < b) if spec["objective"]["minimize"] else (lambda a, b: a > b)
    for t in finished:
        if t.state == TrialState.COMPLETE and (lead is None or better(t.value, lead)):
            lead = t.value
        rows.append({"trial": t.number, "state": t.state.name.lower(), **space.chosen(t.params),
                     **t.user_attrs.get("scores", {}), "objective": t.value, "best": lead})
    recipe = recipe_for(space, best.params)
    header = (f"# The best recipe search '{name}' found (conf/searches/{name}.yaml): trial {best.number}, the "
              f"best of {len(finished)} finished, validation objective {best.value:.6g}.\n")
    write_json(files["best"], {"trial": best.number, "trials": len(finished), "objective": best.value,
                               "values": space.chosen(best.params),
                               "validation": {suite: {kind: best.user_attrs.get("scores", {})}},
                               "study": study.study_name})
    write_json(files["trials"], {"trials": rows})
    pictures.save(pictures.search(name, rows), files["trials_png"])
    write_text(files["recipe"], header + yaml.safe_dump(recipe, sort_keys=False))
    return files["recipe"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.search", description=(
        "Run the Optuna study of conf/searches/NAME.yaml until its budget is spent (trials tuned on the "
        "validation split only), wait for other workers, then write the best recipe, the best trial and "
        "every trial to artifacts/searches/NAME/. Run by `dvc repro` as the stage search-NAME."))
    p.add_argument("name", metavar="NAME", help="the search, by its file conf/searches/NAME.yaml")
    p.add_argument("--worker", action="store_true",
                   help="only run trials of the study (another worker: on this machine or one sharing its storage)")
    p.add_argument("--submit", type=int, metavar="N", help="start N more workers through submitit and wait for them")
    p.add_argument("--on", choices=("local", "slurm"), default="local",
                   help="where --submit starts them: local processes, or one SLURM array job (default: local)")
    p.add_argument("--partition", help="SLURM: the partition")
    p.add_argument("--minutes", type=int, help="SLURM: each worker's time limit")
    p.add_argument("--cpus", type=int, help="SLURM: CPUs per worker")
    p.add_argument("--gpus", type=int, help="SLURM: GPUs per worker (for a search with device: cuda)")
    args = p.parse_args(argv)
    params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").is_file() else None
    if not params or args.name not in (params.get("searches") or {}):
        print(f"error: no search '{args.name}' in params.yaml (run `dvc repro`, which composes conf/ first)",
              file=sys.stderr)
        return 2
    try:
        if args.submit:
            return _submit(args)
        out = search(args.name, params, Path.cwd(), args.worker)
    except (SearchError, EvalError, MergeError, RecipeError, LineageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = f"this worker ran {out} trials" if args.worker else f"the best recipe is in {out}"
    print(f"search {args.name}: {done}", file=sys.stderr)
    return 0


def _submit(args) -> int:
    from .workers import executor, submit

    slurm = {"slurm_partition": args.partition, "timeout_min": args.minutes, "cpus_per_task": args.cpus,
             "gpus_per_node": args.gpus, "slurm_array_parallelism": args.submit}
    jobs = submit(args.name, Path.cwd(), args.submit, executor(args.name, Path.cwd(), args.on, slurm))
    print(f"search {args.name}: {len(jobs)} workers submitted ({args.on}): jobs {', '.join(j.job_id for j in jobs)}",
          file=sys.stderr)
    ran = [job.result() for job in jobs]  # a failed job raises, with its log's path
    print(f"search {args.name}: the workers ran {sum(ran)} trials ({', '.join(map(str, ran))}); "
          "`dvc repro` gathers the best", file=sys.stderr)
    return 0
