"""Searches: an Optuna study over a recipe's coefficients, tuned on validation scores; its best
recipe enters the graph as an ordinary merge (see stage.py)."""
