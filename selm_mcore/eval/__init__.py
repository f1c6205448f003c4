"""Benchmarks of a policy: AlpacaEval 2 and MT-Bench answers, an offline judge, official files.

``benchmarks`` reads the prompts and reference answers (their official formats) and says how
each benchmark is decoded; ``answers`` generates the answers with vLLM and writes the files the
official judges read; ``judge`` is the offline judge (the configured ranker's win rate against
the references, and answer lengths); ``official`` prints and, when possible, runs the official
judges; ``report`` makes the per-round table and plot; ``cli`` is ``selm eval``. See
``docs/eval.md``.
"""
