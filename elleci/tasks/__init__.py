"""Small generated data and verifiable tasks for examples and evaluation (no downloads)."""
from .corpus import synthetic_corpus

__all__ = ["synthetic_corpus"]
