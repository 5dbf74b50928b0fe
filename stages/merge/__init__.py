"""The merge stage: one recipe of conf/merges built with the engine (mergekit_ops) and recorded in MLflow."""
