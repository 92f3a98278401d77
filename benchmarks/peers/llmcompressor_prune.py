"""llm-compressor's one-shot Wanda / SparseGPT on the same model and windows (run in its own venv).

    VENV/bin/python benchmarks/peers/llmcompressor_prune.py MODEL_DIR CALIB.pt OUT_DIR wanda|sparsegpt 0:0|2:4|4:8

Prints one JSON line: wall time of load + oneshot + save (inside the process),
and peak RSS of the process. Perplexity is measured afterwards by wandamerge's
own `ppl` command on the saved directory, so both tools are scored alike.
"""

import json
import resource
import sys
import time

t_start = time.perf_counter()
import torch  # noqa: E402
from importlib.metadata import version  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.pruning import WandaPruningModifier  # noqa: E402
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier  # noqa: E402

model_dir, calib_path, out_dir, method, structure = sys.argv[1:6]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
t1 = time.perf_counter()
windows = torch.load(calib_path)
dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
modifier_cls = WandaPruningModifier if method == "wanda" else SparseGPTModifier
sparsity = 0.5
recipe = modifier_cls(sparsity=sparsity, mask_structure=structure, targets=[r"re:model.layers.\d+$"])
oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1], batch_size=1, shuffle_calibration_samples=False,
        pipeline="sequential")
t2 = time.perf_counter()
model.save_pretrained(out_dir, save_compressed=False)
tokenizer.save_pretrained(out_dir)
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "oneshot_s": t2 - t1, "save_s": t3 - t2, "in_process_s": t3 - t0,
                  "imports_s": t0 - t_start,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch",
                                                       "transformers")}}))
