"""Error types: every failure a user can cause names the file, key, model or tensor at fault."""


class MergeError(Exception):
    """Base class for every error mergekit_ops raises on bad input."""


class RecipeError(MergeError):
    """The recipe YAML is invalid; the message names the file and the key."""

    def __init__(self, message: str, source: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (source, f"key '{key}'" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.key = source, key


class CheckpointError(MergeError):
    """An input checkpoint is missing, unsafe, or incompatible with the recipe."""
