"""Stage 3's engine: task vectors per layer and the streaming merge that applies a registered method to every tensor."""
