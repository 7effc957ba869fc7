"""What is in a model: massive activations, super weights, attention sinks, the stop-word shift, locating layer by layer (docs/layout.md)."""
