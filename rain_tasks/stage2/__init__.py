"""RAIN Stage 2: instruction-attention statistics along the merge's update and the per-head α solved from them."""
