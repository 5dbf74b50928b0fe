"""End to end with evaluation: `dvc repro` evaluates every model and merge once, reports each
merge against its parents, publishes a target (dry run), and MLflow holds the lineage; a suite
edit reruns the evaluations and no merge (reports and publication only if a metric changed)."""
import json
import random
import sys

import pytest

from pipeline import ALWAYS, new_project, repro, run, write_conf
from tiny import fresh_seed, write_causal_lm

pytestmark = pytest.mark.slow  # end-to-end: DVC projects built and run (`pytest -m 'not slow'` skips them)


@pytest.fixture(scope="module")
def built(tmp_path_factory, mlflow_template):
    root = tmp_path_factory.mktemp("pipeline-eval")
    seed = fresh_seed()
    rng = random.Random(seed)
    models = {n: write_causal_lm(root / "src" / n, seed + i) for i, n in enumerate(("a", "b"))}
    words = lambda n: " ".join(f"w{rng.randrange(21)}" for _ in range(n))  # noqa: E731
    files = {"data/text.txt": "\n".join(words(rng.randint(3, 12)) for _ in range(6)) + "\n",
             "data/qa.jsonl": "".join(json.dumps({"prompt": words(3), "answer": words(1)}) + "\n" for _ in range(5))}
    conf = {"eval/lm": {"kind": "perplexity", "tasks": {"text": "data/text.txt"}},
            "eval/qa": {"kind": "exact_match", "tasks": {"qa": "data/qa.jsonl"}, "max_new_tokens": 2},
            "publish/mix": {"model": "mix", "repo_id": "me/mix", "gates": {"max_score": {"lm/text": 1e9}}}}
    merges = {"soup": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in "ab"]},
              "mix": {"merge_method": "linear", "models": [{"model": "soup", "parameters": {"weight": 1.0}},
                                                           {"model": "a", "parameters": {"weight": 1.0}}]}}
    project = new_project(root / "project", {n: {"source": "local", "path": str(p), "license": "mit"}
                                             for n, p in models.items()}, merges, conf=conf, files=files,
                          mlflow_db=mlflow_template)
    ran, _ = repro(project)
    return project, ran


def test_every_model_is_evaluated_and_every_merge_reported_and_published(built):
    project, ran = built
    assert ran == ALWAYS | {"merge-soup", "merge-mix", "eval-a", "eval-b", "eval-soup", "eval-mix",
                   "report-soup", "report-mix", "publish-mix"}
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    shown = json.dumps(metrics)
    for name in ("a", "b", "soup", "mix"):
        assert f"artifacts/eval/{name}.json" in shown
    assert "artifacts/reports/mix/retention.json" in shown
    table = (project / "artifacts/reports/mix/report.md").read_text()
    assert "mix (merge) | a (parent) | soup (parent)" in table  # parents by name
    receipt = json.loads((project / "artifacts/publish/mix/receipt.json").read_text())
    assert receipt["gates"]["passed"] and (project / "artifacts/publish/mix/repo/README.md").is_file()
    plots = run(["dvc", "plots", "show", "--json"], project).stdout
    assert "artifacts/reports/mix/scores.json" in plots and "mix (merge)" in plots


def test_lineage_command_reads_the_merge_of_merges_back(built):
    project, _ = built
    out = run([sys.executable, "-m", "stages.lineage", "mix"], project).stdout.splitlines()
    names = [line.lstrip("├└─│ ").split("  ")[0] for line in out]
    assert names == ["mix", "a", "soup", "a", "b"]


def test_second_repro_runs_nothing_and_a_suite_edit_reruns_no_merge(built):
    project, _ = built
    assert repro(project)[0] == ALWAYS
    write_conf(project, "eval", "qa", {"kind": "exact_match", "tasks": {"qa": "data/qa.jsonl"}, "max_new_tokens": 3})
    ran, _ = repro(project)
    assert {"eval-a", "eval-b", "eval-soup", "eval-mix"} <= ran and not [s for s in ran if s.startswith("merge-")]
    assert ran <= ALWAYS | {"eval-a", "eval-b", "eval-soup", "eval-mix", "report-soup", "report-mix", "publish-mix"}


def test_a_suite_change_and_revert_leave_one_current_metric_set_per_suite_state(built):
    """MLflow after a suite edit and its revert: the soup's model shows two sets of scores told
    apart by their dataset digest (the suite's settings and data), the reverted edit adds no third,
    and the current set (tag, description) is the one of the suites in params.yaml."""
    import mlflow

    project, _ = built
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]

    def soup():
        (model,) = client.search_logged_models(experiments, filter_string="tags.`mergeforge.name` = 'soup'")
        runs = {m.run_id: m.dataset_digest for m in model.metrics if m.key.startswith("qa.")}
        return model, runs

    qa = lambda tokens: {"kind": "exact_match", "tasks": {"qa": "data/qa.jsonl"}, "max_new_tokens": tokens}  # noqa: E731
    write_conf(project, "eval", "qa", qa(4))
    repro(project)
    _, before = soup()
    write_conf(project, "eval", "qa", qa(5))
    repro(project)
    write_conf(project, "eval", "qa", qa(4))  # the revert
    repro(project)  # DVC restores the evaluations from its run cache; the lineage stage finds their set
    model, after = soup()
    assert len(after) == len(before) + 1 and len(set(after.values())) == len(after)  # one new set, digests differ
    current = model.tags["mergeforge.eval.test"].split()[0]
    assert current in before and f"runs/{current})" in model.tags["mlflow.note.content"]
    scores = json.loads((project / "artifacts/eval/soup.json").read_text())["qa"]["exact_match"]
    logged = {m.key: m.value for m in model.metrics if m.run_id == current and m.key.startswith("qa.")}
    assert logged == {f"qa.{t}.exact_match": v for t, v in scores.items()}
