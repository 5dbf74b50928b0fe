"""Errors the pipeline reports to the user: each names the conf file, key, model or repo at fault."""


class ConfigError(Exception):
    """conf/ is invalid or inconsistent (caught at compose time, before anything runs)."""


class FetchError(Exception):
    """A source model cannot be fetched, or cannot work with the recipes that use it."""


class EvalError(Exception):
    """A model cannot be evaluated: a suite's data file, or the model itself, is unusable."""


class LineageError(Exception):
    """MLflow cannot record or return lineage (unreachable server, missing record)."""


class PublishError(Exception):
    """A publish target cannot be staged or pushed, or its model failed a gate."""


class SearchError(Exception):
    """A search cannot run: its trials keep failing, or its study cannot be opened."""
