"""The floor of a prune (for prune_smollm2.py): load the model, one plain decoder forward over the windows, save.

    python benchmarks/programs/prune_floor.py MODEL_DIR CALIB.pt OUT_DIR

Prints one JSON line: seconds of load, forward and save.
"""

import json
import sys
import time

import torch

from wandamerge.models import load_model, save_model

t0 = time.perf_counter()
model, tok = load_model(sys.argv[1])
t1 = time.perf_counter()
windows = torch.load(sys.argv[2]) if sys.argv[2].endswith(".pt") else None
with torch.inference_mode():
    for start in range(0, windows.shape[0], 8):
        model.base_model(input_ids=windows[start:start + 8], use_cache=False)
t2 = time.perf_counter()
save_model(model, tok, sys.argv[3], overwrite=True)
t3 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "forward": t2 - t1, "save": t3 - t2}))
