"""Generation (vLLM), engines, rankers (PairRM) and the new pairs."""
