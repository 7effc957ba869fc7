"""How to analyse a model, one subpackage per question (the module map: docs/layout.md)."""
