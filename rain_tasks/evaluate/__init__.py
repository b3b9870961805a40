"""Evaluation: behaviour of every model on held-out prompts, instruction checkers, the comparison report, sweeps."""
