"""Merge methods: one typed function per method, registered by name (rain_tasks.methods.registry), applied tensor by
tensor by the streaming engine (rain_tasks.merge.engine). Importing the package registers every method module."""

from rain_tasks.methods import linear, mergekit  # noqa: F401  (registration)
from rain_tasks.methods.registry import METHODS, Method, TensorInputs, get_method, merge_method  # noqa: F401
