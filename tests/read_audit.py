"""Run a module as `python -m` does, recording every file and folder it reads (Python's audit
hooks: `open`, `os.listdir`, `os.scandir`), for tests that hold a stage to its dvc.yaml entry.

    python tests/read_audit.py LOG MODULE [ARG ...]     (LOG: "open PATH" or "list PATH" per line)

MERGEFORGE_AUDIT_SHORT_DEMO=1 shortens the demo's training (its reads do not depend on it).
"""
import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def main() -> int:
    log, module, *args = sys.argv[1:]
    read: list[str] = []  # "open /abs/path" (a file read) or "list /abs/path" (a folder listed)

    def hook(event: str, data: tuple) -> None:
        if event == "open":
            path, mode, flags = data
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            kind = "open"
        elif event in ("os.listdir", "os.scandir"):
            path, writing, kind = data[0] if data[0] is not None else ".", False, "list"
        else:
            return
        if not writing and isinstance(path, (str, bytes, os.PathLike)):
            read.append(f"{kind} {os.path.abspath(os.fsdecode(path))}")

    sys.path[0] = os.getcwd()  # as `python -m` has it: the project's own code first, not this folder
    sys.addaudithook(hook)
    if os.environ.get("MERGEFORGE_AUDIT_SHORT_DEMO"):
        from stages.demo import stage as demo

        demo.BASE_STEPS, demo.EXPERT_STEPS, demo.SPLITS = 12, 6, {"validation": 8, "test": 8}
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        seen = sorted(set(read))
        with open(log, "w") as f:
            f.write("".join(line + "\n" for line in seen))
    return code


if __name__ == "__main__":
    sys.exit(main())
