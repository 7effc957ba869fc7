"""What every sweep of in-place edits shares: the loop, the report's rows, the checkpoint, the task figures."""
