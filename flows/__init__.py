"""Prefect orchestration of the DVC pipeline (flows/pipeline.py), its deployment, and promotion."""
