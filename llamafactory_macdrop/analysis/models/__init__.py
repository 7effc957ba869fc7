"""Getting a model to analyse: loading a folder (with its adapter), GGUF conversion (docs/layout.md)."""
