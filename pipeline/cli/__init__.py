"""The command line: ``pipeline run``, ``status``, ``export``, ``estimate``, ``serve``."""

import gc
import os

# pyarrow loads numpy, and numpy's OpenBLAS starts a thread per core that spins for a while:
# 40-70 ms of CPU at every start, taken from the event loop (and, on a small machine, from
# the server it talks to). The command line does no linear algebra; a user's own setting
# wins. (The Python API leaves the caller's process alone.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# No cyclic garbage collection while the modules load (they make no garbage): the collector
# would scan the growing heap some 150 times, 50-80 ms of every start.
gc.disable()
try:
    from pipeline.cli.commands import main
finally:
    gc.enable()

__all__ = ["main"]
