"""The one error the exporter raises: each message names the model file or config key at fault."""


class ExportError(Exception):
    """A model folder cannot be exported for local runtimes (architecture, tokenizer, config)."""
