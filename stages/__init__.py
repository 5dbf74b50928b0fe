"""Pipeline stages, one package each (compose, demo, fetch, merge, evaluate, lineage, publish), the
parts they share (common) and the `mergeforge` command (cli): the glue between conf/, DVC, MLflow
and the hub. A stage parses its part of params.yaml, calls library code and writes its outputs
atomically."""
