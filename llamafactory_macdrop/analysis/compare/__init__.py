"""Plain LoRA against MacDrop: the runs, their evaluation on one base, paired statistics, the report and its plots (docs/layout.md)."""
