"""Evaluation: perplexity at every loop exit (and few-shot scoring)."""
