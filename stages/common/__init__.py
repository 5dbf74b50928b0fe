"""What every stage shares: the artifact layout, the MLflow store, digests, metrics files, atomic
writes, the errors a stage reports and its command line. Nothing here imports a stage."""
