"""Small generated data and verifiable tasks for examples and evaluation (no downloads)."""
from . import arithmetic, lexicon, translation
from .arithmetic import (LEVELS, Problem, binary_feedback, evaluate, extract_answer, make_problems,
                         preference_pairs, scored_feedback, sft_examples, verify)
from .corpus import synthetic_corpus

__all__ = ["synthetic_corpus", "arithmetic", "lexicon", "translation", "Problem", "LEVELS", "make_problems", "extract_answer", "verify",
           "sft_examples", "preference_pairs", "binary_feedback", "scored_feedback", "evaluate"]
