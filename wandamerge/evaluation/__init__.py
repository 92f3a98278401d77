"""Measuring models: perplexity, offline tasks over real labelled data, and zero-shot accuracy through lm-eval."""

from .perplexity import perplexity

__all__ = ["perplexity"]
