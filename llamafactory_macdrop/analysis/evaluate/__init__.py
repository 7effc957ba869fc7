"""Scoring a model: batched greedy generation, offline generation tasks, reference metrics and a judge."""
