"""Lineage: how an artifact was made, read back from MLflow."""
