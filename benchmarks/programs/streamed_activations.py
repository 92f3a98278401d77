"""The calibration pass of a Wanda-scored merge alone, streamed block by block (for streaming_1p5b.py).

    python benchmarks/programs/streamed_activations.py MODEL_DIR CALIB.pt

``collect_input_norms`` over the model with a ``StreamedModel`` loader, in a process of its own so that
its peak RSS is its own. Prints one JSON line: the linear maps measured and the seconds.
"""

import json
import sys
import time

import torch

from wandamerge.jobs.merge import collect_input_norms
from wandamerge.loaders import StreamedModel

t = time.perf_counter()
model = StreamedModel(sys.argv[1])
norms = collect_input_norms(model.model, torch.load(sys.argv[2]), loader=model.loader(), progress=False)
print(json.dumps({"linear_maps": len(norms), "seconds": round(time.perf_counter() - t, 1)}))
