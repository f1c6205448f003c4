"""Preference rows, portions, tokenisation, batches and packing (pure CPU, no Megatron)."""
