"""Compatibility paths for code written against older TensorFlow APIs (see docs/MIGRATION.md)."""
