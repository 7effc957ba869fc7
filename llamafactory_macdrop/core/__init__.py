"""The method, importable without LLaMA-Factory: which rows, how much when, what dropping does (docs/layout.md)."""
