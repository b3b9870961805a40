"""Files and formats: checkpoints (sharded safetensors), architectures, digests, guards on names and headers, table schemas, plots, DVC remotes."""
