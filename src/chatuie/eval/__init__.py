"""Evaluation: strict F1, comparisons with intervals, the promotion gate, reports, the viewer."""
