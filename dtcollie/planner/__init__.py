"""The layout planner: per-rank memory, communication per step and a time model, for choosing dp / tp / pp."""
