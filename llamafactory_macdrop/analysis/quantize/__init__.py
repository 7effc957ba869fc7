"""Round-to-nearest fake quantization with super weights kept (Yu et al.): the rule, the model side, the report."""
