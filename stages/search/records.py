"""A search in MLflow: one run per study (tagged with the search and study names), each finished
trial a nested run with its values, validation scores and objective, the best trial tagged.
Workers on the same study log their trials under the same search run."""
from __future__ import annotations

from ..common import tracking
from ..common.tracking import TAG, mlflow_errors


def search_run(name: str, study_name: str) -> str:
    """The id of the study's MLflow run, created on first use (a resumed search goes on in it)."""
    import mlflow

    experiment = tracking.connect()
    found = tracking.search_run_ids(study_name)
    if found:
        return found[0]
    with mlflow_errors(f"cannot record search '{name}'"):
        tags = {f"{TAG}search": name, f"{TAG}study": study_name, f"{TAG}dvc_stage": f"search-{name}",
                f"{TAG}git_commit": tracking.git_commit()}
        return mlflow.MlflowClient().create_run(experiment, tags=tags, run_name=f"search-{name}").info.run_id


def log_trial(parent: str, name: str, number: int, state: str, values: dict, scores: dict,
              objective: float | None, seconds: float | None) -> None:
    """A nested run for one finished trial."""
    import mlflow

    client = mlflow.MlflowClient()
    with mlflow_errors(f"cannot record trial {number} of search '{name}'"):
        experiment = client.get_run(parent).info.experiment_id
        run = client.create_run(experiment, run_name=f"{name}-trial-{number}",
                                tags={"mlflow.parentRunId": parent, f"{TAG}search": name,
                                      f"{TAG}trial": str(number), f"{TAG}state": state})
        for key, value in values.items():
            client.log_param(run.info.run_id, key, value)
        for task, score in scores.items():
            client.log_metric(run.info.run_id, f"validation.{task}", score)
        if objective is not None:
            client.log_metric(run.info.run_id, "objective", objective)
        if seconds is not None:
            client.log_metric(run.info.run_id, "seconds", seconds)
        client.set_terminated(run.info.run_id, "FINISHED" if state != "fail" else "FAILED")


def mark_best(parent: str, name: str, number: int, objective: float) -> None:
    """Tag the best trial's run, and record it on the search run."""
    import mlflow

    client = mlflow.MlflowClient()
    with mlflow_errors(f"cannot record the best trial of search '{name}'"):
        experiment = client.get_run(parent).info.experiment_id
        for run in client.search_runs([experiment], f"tags.`{TAG}search` = '{name}' AND "
                                                    f"tags.`mlflow.parentRunId` = '{parent}'"):
            best = run.data.tags.get(f"{TAG}trial") == str(number)
            if best or run.data.tags.get(f"{TAG}best") == "true":
                client.set_tag(run.info.run_id, f"{TAG}best", "true" if best else "false")
        client.set_tag(parent, f"{TAG}best_trial", str(number))
        client.log_metric(parent, "best_objective", objective)
        client.set_terminated(parent, "FINISHED")
