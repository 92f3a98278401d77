#!/usr/bin/env bash
# Wanda 2:4 on the embedded SmolLM2-135M-Instruct, 128 Wikipedia windows of 512 tokens,
# dense and pruned perplexity on held-out articles. Other methods: --method sparsegpt|magnitude,
# unstructured: --sparsity 0.5, the paper's ablations: --group tensor, --variant, --update.
set -euo pipefail
wandamerge prune smollm2 -o "${1:-smollm2-wanda-2of4}" --method wanda --pattern 2:4 \
  --calib wiki --nsamples 128 --seqlen 512 --eval-ppl wiki
