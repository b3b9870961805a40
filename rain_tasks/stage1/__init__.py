"""RAIN Stage 1: reasoning features at the thinking tokens, the null-space projection of Δ_I, and the orthogonality analysis."""
