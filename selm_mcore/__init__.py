"""SELM on Megatron-Core."""
