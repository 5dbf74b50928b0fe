"""A search's Optuna study: where it is stored, its name, its sampler, and the loop that runs
trials until the budget is spent (by this worker and any others on the same study).

One worker and one seed give the same trials on every run, killed and resumed or not: the sampler
of each trial is seeded by the search's seed and the number of trials finished before it, and a
trial killed while running is failed on resume and its turn asked again.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from mergekit_ops import MergeError, RecipeError

from ..common.digest import directory_digest, file_sha256
from ..common.errors import EvalError, SearchError
from ..common.splits import data_files
from .space import Space
from .trials import Pruned, alive

MAX_ERRORS_IN_A_ROW = 3
WORKER = "mergeforge.worker"  # a trial's user attribute: "host:pid" of the worker that runs it


def open_study(name: str, spec: dict, root: Path):
    """The study of this search as it is now: its name digests the search and its inputs' contents,
    so an edit, or new weights or data, starts a new study and an unchanged search resumes."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=study_name(name, spec), storage=storage(name, spec, root),
                               direction="minimize" if spec["objective"]["minimize"] else "maximize",
                               load_if_exists=True)


def storage(name: str, spec: dict, root: Path):
    """The search's `storage` URL (an RDB URL, or journal:PATH for a journal file, e.g. on a shared
    disk), else a journal file in .mergeforge/searches/ (Optuna's advice for several processes)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    url = spec.get("storage")
    if url and not url.startswith("journal:"):
        return url
    path = Path(url[len("journal:"):]) if url else root / ".mergeforge" / "searches" / f"{name}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def study_name(name: str, spec: dict) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k != "storage"}, sort_keys=True).encode())
    for ref, folder in sorted(spec["inputs"].items()):
        h.update(f"{ref}\0{directory_digest(Path(folder))}\0".encode())
    for path in data_files(spec["objective"]["data"], "validation"):
        h.update(f"{path}\0{file_sha256(Path(path))}\0".encode())
    return f"{name}-{h.hexdigest()[:12]}"


def sampler(kind: str, seed: int, space: Space):
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler({d.name: d.grid() for d in space.dims}, seed=seed)


def turn_seed(seed: int, finished: int, erred: int) -> int:
    """The seed of the sampler that picks the next trial, after `finished` finished ones and
    `erred` that failed with an error (a trial failed because its worker was killed does not
    count: its turn is asked again the same)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{finished}\0{erred}".encode()).digest()[:4], "little")


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_orphans(study) -> list[int]:
    """Fail the running trials of workers of this machine that are gone (killed): their turns are
    asked again. Trials of other machines are theirs to finish."""
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get(WORKER, ""))
        on, _, pid = owner.rpartition(":")
        if on == host and pid.isdigit() and not alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed


def run_trials(study, spec: dict, space: Space, trials, on_trial=None) -> int:
    """Ask, run and tell trials until the budget's trials are finished or running, or its minutes
    are over; on_trial(trial number) after each; returns how many finished here. Orphans of
    killed workers are failed first."""
    import optuna
    from optuna.trial import TrialState

    failed = fail_orphans(study)
    if failed:
        print(f"search: trials {', '.join(map(str, failed))} were left running by a killed worker: asked again",
              file=sys.stderr)
    budget = spec["budget"]
    deadline = time.monotonic() + 60 * budget["minutes"] if budget.get("minutes") else None
    pruner = spec.get("pruner")
    study.pruner = (optuna.pruners.PercentilePruner(pruner["percentile"], n_startup_trials=pruner["startup"])
                    if pruner else optuna.pruners.NopPruner())
    distributions, errors, ran = space.distributions(), 0, 0
    while True:
        trials_now = study.get_trials(deepcopy=False)  # one read of the storage per turn
        done = [t for t in trials_now if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        erred = [t for t in trials_now if t.state == TrialState.FAIL and "error" in t.user_attrs]
        running = [t for t in trials_now if t.state == TrialState.RUNNING]
        if budget.get("trials") and len(done) + len(running) >= budget["trials"]:
            return ran
        if deadline is not None and time.monotonic() >= deadline:
            return ran
        study.sampler = sampler(spec["sampler"], turn_seed(spec["seed"], len(done), len(erred)), space)
        # the trial is created owned, before ask samples it (TPE takes a while there): a worker
        # killed meanwhile leaves a trial that fail_orphans knows as its own
        study.enqueue_trial({}, user_attrs={WORKER: this_worker()})
        trial = study.ask(distributions)
        trial.set_user_attr(WORKER, this_worker())  # it may have taken another worker's waiting trial
        if budget.get("trials") and _ahead(study, trial.number) >= budget["trials"]:  # another worker asked first
            trial.set_user_attr("over_budget", True)
            study.tell(trial, state=TrialState.FAIL)
            return ran
        start = time.monotonic()

        def report(value: float) -> None:
            trial.report(value, 0)
            if trial.should_prune():
                raise Pruned(f"{value:.4g} at the pruner's share")

        try:
            scores = trials.run(trial.params, report)
        except (MergeError, RecipeError, EvalError) as exc:  # e.g. values that make a NaN
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            print(f"search: trial {trial.number} failed: {exc}", file=sys.stderr)
            errors += 1
            if errors >= MAX_ERRORS_IN_A_ROW:
                raise SearchError(f"{MAX_ERRORS_IN_A_ROW} trials in a row failed; the last: {exc}") from None
            continue
        except Pruned:
            trial.set_user_attr("seconds", round(time.monotonic() - start, 3))
            study.tell(trial, state=TrialState.PRUNED)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)  # interrupted: its turn is asked again on resume
            raise
        else:
            errors = 0
            trial.set_user_attr("scores", scores)
            trial.set_user_attr("seconds", round(time.monotonic() - start, 3))
            study.tell(trial, trials.objective(scores))
        ran += 1
        if on_trial:
            on_trial(trial.number)


def _ahead(study, number: int) -> int:
    """Trials numbered before `number` that count against the budget (finished or running): trial
    numbers are handed out in one order by the storage, so two workers never both take the last."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(t.number < number for t in study.get_trials(deepcopy=False, states=states))


def wait_for_others(study, poll: float = 1.0) -> None:
    """Until no trial is running (other workers finishing theirs, or orphans of this machine)."""
    from optuna.trial import TrialState

    said = None
    while True:
        fail_orphans(study)
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if not running:
            return
        if running != said:
            print(f"search: waiting for trials {', '.join(map(str, running))} of other workers", file=sys.stderr)
            said = running
        time.sleep(poll)
