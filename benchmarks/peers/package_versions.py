"""The installed versions of some packages, as one JSON line; run by a peer's own venv python, so stdlib only.

    VENV/bin/python benchmarks/peers/package_versions.py mergekit torch transformers
"""

import importlib.metadata
import json
import sys

print(json.dumps({p: importlib.metadata.version(p) for p in sys.argv[1:]}))
