"""Evaluation entry points and metric code (repo-local, run from the repository root)."""
