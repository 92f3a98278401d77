"""Evaluation: perplexity (more in later work)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
