"""Merge methods: one typed function per method, registered by name, applied tensor by tensor by rain_tasks.merge."""
