"""Run a command; print its wall seconds and the peak RSS in bytes of its process tree (for merge_vs_mergekit.py).

    python benchmarks/programs/measure.py COMMAND [ARGS ...]

A process of its own, so that the peak RSS of its children is the command's alone.
"""

import resource
import subprocess
import sys
import time

t = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if code.returncode:
    sys.stderr.write(code.stderr[-3000:])
    sys.exit(code.returncode)
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
