"""The floor of a data-free merge (for merge_vs_mergekit.py): read every input tensor, write an output of the same size.

    python benchmarks/programs/merge_floor.py BASE_DIR FINETUNE_DIR ... OUT_DIR
"""

import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

inputs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
out.mkdir(parents=True, exist_ok=True)
handles = [safe_open(p / "model.safetensors", "pt") for p in inputs]
result = {}
for name in handles[0].keys():
    tensors = [h.get_tensor(name) for h in handles]
    result[name] = tensors[0].clone()
save_file(result, str(out / "model.safetensors"))
