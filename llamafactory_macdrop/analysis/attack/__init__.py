"""Editing a loaded model in place and restoring it bit for bit: attacks, the one sweep loop, generation under attack, quantization (docs/layout.md)."""
