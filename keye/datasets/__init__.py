"""Datasets the pipeline generates itself (their cards live in the top-level datasets/ folder)."""
