"""Run many mergekit recipes in ONE mergekit process (its imports cost seconds per `mergekit-yaml`).

Run it with mergekit's own python (a side environment with mergekit 0.1.5), never ours:

    /path/to/mergekit-venv/bin/python bench/mergekit_batch.py JOBS.json RESULTS.json

JOBS.json: {"lora_merge_cache": DIR, "jobs": [{"name": ..., "recipe": PATH, "out": DIR,
"copy_tokenizer": bool}, ...]}. Each job goes through mergekit's Python API as `mergekit-yaml
RECIPE OUT --no-write-model-card --no-lazy-unpickle --quiet` would (cpu). RESULTS.json:
{"mergekit_version": ..., "import_seconds": ..., "results": {job name: {"ok": bool, "seconds": float,
"error": traceback or null}}}. A failing job does not stop the
others. Imports nothing from this repository.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import_s = time.perf_counter() - t0
    from importlib.metadata import version
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    results: dict[str, dict] = {}
    for job in spec["jobs"]:
        start = time.perf_counter()
        try:
            with open(job["recipe"], encoding="utf-8") as f:
                source = f.read()
            config = MergeConfiguration.model_validate(yaml.safe_load(source))
            options = MergeOptions(copy_tokenizer=bool(job.get("copy_tokenizer", False)), write_model_card=False,
                                   lazy_unpickle=False, device="cpu", quiet=True,
                                   lora_merge_cache=spec.get("lora_merge_cache"))
            options.apply_global_options()
            run_merge(config, job["out"], options=options, config_source=source)
            results[job["name"]] = {"ok": True, "seconds": time.perf_counter() - start, "error": None}
        except Exception:  # one broken case must not hide the others' results
            results[job["name"]] = {"ok": False, "seconds": time.perf_counter() - start,
                                    "error": traceback.format_exc()}
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump({"mergekit_version": version("mergekit"), "import_seconds": import_s, "results": results}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
