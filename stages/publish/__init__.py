"""The publish stage: gates, a model card and a hub repo for one merge."""
