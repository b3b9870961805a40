"""RAIN-Merging pipeline library.

OpenMP threads that spin while waiting make torch orders of magnitude slower when more threads
than cores are busy (two processes on a 2-core machine, say); passive waiting does not change
results. Set here, before anything imports torch, unless the user chose otherwise.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
