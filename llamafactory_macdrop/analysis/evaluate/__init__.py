"""Scoring a model: perplexity, zero-shot accuracy, generation tasks and a judge, on the model in memory (docs/layout.md)."""
