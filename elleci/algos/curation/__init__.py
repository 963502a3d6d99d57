"""Data curation (plan §4): LESS selection, synthetic data, curriculum (two-stage tuning), corpus distillation,
retrieval. (Not `data`: `elleci.data` holds the JSONL readers.)"""
from .curriculum import CurriculumConfig, StageConfig, run_stages, task_probabilities
from .distill import Agents, Chunk, Triple, distill, load_chunks, read_records
from .less import less_scores, project, select_top
from .less_grads import per_example_grads, warmup_lora
from .less_store import FeatureStore, collect_features
from .retrieval import BM25, BM25Retriever, EmbeddingRetriever
from .synth import AttributeGrid, TaskSpec, build_prompts, synthesize
from .synth_filters import apply_filters, near_dedup_filter, verifier_filter
from .synth_metrics import dataset_report

__all__ = ["CurriculumConfig", "StageConfig", "run_stages", "task_probabilities", "Agents", "Chunk", "Triple",
           "distill", "load_chunks", "read_records", "less_scores", "project", "select_top", "per_example_grads",
           "warmup_lora", "FeatureStore", "collect_features", "BM25", "BM25Retriever", "EmbeddingRetriever",
           "TaskSpec", "AttributeGrid", "build_prompts", "synthesize", "apply_filters", "verifier_filter",
           "near_dedup_filter", "dataset_report"]
