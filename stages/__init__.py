"""Pipeline stages (fetch, merge, evaluate, publish): the glue between conf/, DVC, MLflow and the hub.

Each stage is a thin module: parse its config, call library code, write outputs atomically.
"""
