"""Fused kernels, imported as ``selm_mcore.kernels`` (see setup.py)."""
