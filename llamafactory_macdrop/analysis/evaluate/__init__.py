"""Scoring a model: perplexity and zero-shot accuracy, on the model in memory (docs/layout.md)."""
