"""`mergeforge`: what a user of a project runs by hand (`dvc repro` runs the stages themselves).

    mergeforge new DIR          a project of one's own
    mergeforge check            check conf/ (and whether dvc.yaml matches it); builds nothing
    mergeforge compose          write params.yaml and dvc.yaml from conf/ now
    mergeforge report           every model's and merge's scores as one table
    mergeforge lineage NAME     how a model or merge was made, read back from MLflow
    mergeforge lineage --sync   record every current build the MLflow store lacks (a teammate's, a server)
    mergeforge search NAME ...  a search's trials by hand: another worker, or N through submitit
    mergeforge export DIR OUT   a model folder as a GGUF, Ollama Modelfile and LM Studio layout
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeforge", description="A declarative build system for merged models: "
                                "recipes in conf/, builds by DVC (`dvc repro`), lineage in MLflow, publishing to "
                                "the Hugging Face hub. These commands are what one runs by hand.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new = sub.add_parser("new", help="start a project of one's own in DIR",
                         description="Create DIR as a mergeforge project: git and DVC initialised, the demo off, "
                         "conf/examples with a commented example of each conf/ file, and a small evaluation suite "
                         "(conf/eval/mine.yaml over data/eval/mine.jsonl) to replace with your own.")
    new.add_argument("dir", metavar="DIR", type=Path, help="the project folder to create (new, or empty)")
    for name, text in (("check", "check conf/ and say whether dvc.yaml matches it; write nothing"),
                       ("compose", "write params.yaml and dvc.yaml from conf/ (what `dvc repro` does first)")):
        cmd = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                         help="a Hydra override of a conf/ value, e.g. merges.soup.seed=3")
        cmd.add_argument("--root", type=Path, default=Path.cwd(), help="the project (default: the current directory)")
    sub.add_parser("report", help="print every evaluated model's and merge's scores as one markdown table",
                   description="Print every evaluated model's and merge's scores (artifacts/eval/NAME.json) as "
                   "one markdown table, with each suite's mean where higher is better.")
    lineage = sub.add_parser("lineage", help="print how a model or merge was made, from MLflow",
                             description="Print the lineage tree of NAME from MLflow: the merges it was made from, "
                             "down to the source models with their hub commits or paths and content digests. The "
                             "store is MLFLOW_TRACKING_URI when set, else mlflow.db in the project.")
    lineage.add_argument("name", metavar="NAME", nargs="?", help="a model (conf/models) or merge (conf/merges) by name")
    lineage.add_argument("--sync", action="store_true", help="instead, record every current build (models, merges, "
                         "metrics, registry aliases) the store lacks, from params.yaml and the files; builds "
                         "`dvc status` finds out of date are left out")
    forwarded = {  # name: (help, description, what its arguments are, their help)
        "search": ("run a search's trials by hand: another worker, or N through submitit",
                   "Run the search of conf/searches/NAME.yaml (`dvc repro` runs it as the stage search-NAME). "
                   "`mergeforge search NAME --worker` adds a worker to its study, on this machine or another "
                   "sharing its storage; `--submit N [--on slurm]` starts N through submitit. "
                   "`mergeforge search NAME --help` lists every option.",
                   "NAME [OPTION ...]", "the search, then the options of `python -m stages.search`"),
        "export": ("export a model folder for llama.cpp, Ollama and LM Studio",
                   "Write MODEL_DIR (a Llama-family safetensors model) as OUT_DIR/model.gguf, OUT_DIR/Modelfile "
                   "(Ollama) and OUT_DIR/lmstudio/PUBLISHER/MODEL/FILE.gguf. In a project, conf/exports/NAME.yaml "
                   "does it as a stage. `mergeforge export DIR OUT --help` lists the options.",
                   "MODEL_DIR OUT_DIR [OPTION ...]",
                   "the model folder, the output folder, then --type, --name, --publisher"),
    }
    for name, (text, description, metavar, args_help) in forwarded.items():  # their own parsers read the rest
        sub.add_parser(name, help=text, description=description).add_argument(
            "args", nargs=argparse.REMAINDER, metavar=metavar, help=args_help)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "new":
        return _new(args.dir)
    if args.command == "check":
        return _check(args.root, args.overrides)
    if args.command == "compose":
        return _compose(args.root, args.overrides)
    if args.command == "report":
        from .evaluate.report import main as report

        return report(["--all"])
    if args.command == "search":
        from .search.stage import main as search

        return search(args.args)
    if args.command == "export":
        from .export.gguf_export import main as export

        return export(args.args)
    from .lineage.stage import main as lineage

    return lineage(([args.name] if args.name else []) + (["--sync"] if args.sync else []))


def _compose(root: Path, overrides: list[str]) -> int:
    from mergekit_ops import RecipeError

    from .common.errors import ConfigError, FetchError
    from .compose.stage import plan, report_error, write

    try:
        change = write(root, *plan(root, overrides))
    except (ConfigError, RecipeError, FetchError, OSError) as exc:  # an OSError names its file
        return report_error(str(exc))
    print(f"dvc.yaml rewritten ({change}): `dvc repro` builds it" if change else "dvc.yaml already matches conf/",
          file=sys.stderr)
    return 0


def _new(target: Path) -> int:
    from .common.errors import ConfigError
    from .new_project import create

    try:
        create(target)
    except (ConfigError, OSError) as exc:  # an OSError names its file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created {target}: copy files of {target / 'conf' / 'examples'} into conf/models and conf/merges, "
          "then `dvc repro` (twice the first time: it writes the graph, then builds it)", file=sys.stderr)
    return 0


def _check(root: Path, overrides: list[str]) -> int:
    from mergekit_ops import RecipeError

    from .common.errors import ConfigError, FetchError
    from .compose.stage import matches, plan, report_error

    try:
        params, dvc_yaml = plan(root, overrides, pin=False)
    except (ConfigError, RecipeError, FetchError) as exc:
        return report_error(str(exc))
    count = lambda n, what: f"{n} {what}{'' if n == 1 else 's'}"  # noqa: E731
    print(f"conf/ is valid: {count(len(params['models']), 'model')}, {count(len(params['merges']), 'recipe')}, "
          f"{count(len(params['evaluate']['suites']), 'evaluation suite')}, "
          f"{count(len(params['publish']), 'publish target')}")
    if params["merges"] and not params["evaluate"]["suites"]:
        print("note: conf/eval holds no suite, so nothing is evaluated")
    if not matches(root, dvc_yaml):
        print("dvc.yaml does not match conf/ yet: `dvc repro` rewrites it and stops once (run it again), "
              "or `mergeforge compose` rewrites it now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
