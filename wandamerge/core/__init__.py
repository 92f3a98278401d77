"""Pure tensor math, importing nothing else of the project but its errors: scores, selection, SparseGPT's solver."""
