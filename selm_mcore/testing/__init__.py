"""Tiny offline assets and the CPU demo's data (not used by the product path)."""
