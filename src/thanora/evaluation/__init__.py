"""Scoring: `evaluate` (log-likelihood ranking of options and greedy generation) and `metrics` (accuracy, exact
match, relaxed accuracy, ANLS and the answer extraction they share)."""
