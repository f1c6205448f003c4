"""Errors, files, child processes, pre-flight and optional-dependency checks."""
