"""The bottom layer: safetensors reading and writing, dtypes, staged output, model arguments, run records."""
