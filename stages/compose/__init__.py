"""The head of the build: conf/ composed with Hydra and checked, written out as params.yaml (what
every stage reads) and dvc.yaml (the graph)."""
