"""Run in mergekit's own environment: mergekit 0.1.5's merge_tensors on the cases saved by a test.

    python mergekit_merge_tensors.py CASES.pt RESULTS.pt
"""
import sys
import torch
import mergekit
from importlib.metadata import version
from mergekit.merge_methods.api import merge_tensors

assert version("mergekit") == "0.1.5", version("mergekit")
cases = torch.load(sys.argv[1])
results = []
for case in cases:
    torch.manual_seed(case["seed"])
    if case["method"] == "linear":
        out = merge_tensors(case["finetuned"], "linear", parameters=case["parameters"])
    else:
        out = merge_tensors([case["base"], *case["finetuned"]], case["method"],
                            parameters=case["parameters"], base_index=0)
    results.append(out)
torch.save(results, sys.argv[2])
