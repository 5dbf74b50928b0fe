"""Errors the pipeline reports to the user: each names the conf file, key, model or repo at fault."""


class ConfigError(Exception):
    """conf/ is invalid or inconsistent (caught at compose time, before anything runs)."""


class FetchError(Exception):
    """A source model cannot be fetched, or cannot work with the recipes that use it."""
