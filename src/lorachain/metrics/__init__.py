"""Scoring generated images: embedding models (DINO, CLIP, CSD) loaded once per job, the metric
math, and scoring of sample sets. Submodules: ``encoders``, ``scoring``."""
