"""The typed config tree and its validation."""
