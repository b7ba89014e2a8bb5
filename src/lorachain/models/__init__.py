"""Pipelines: real ones by hub id or local path, tiny ones of the same classes built from config."""
