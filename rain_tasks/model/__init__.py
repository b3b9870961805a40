"""Running a model: device and dtype, tokenizers and chat rendering, activation capture, generation."""
