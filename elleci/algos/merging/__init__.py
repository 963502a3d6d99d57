"""Merging and growth (plan §3): merge methods (linear, task arithmetic, TIES, DARE, SLERP), RegMean, FSLoRA,
TLI. The merge command: `python -m elleci.algos.merging CONFIG.json`."""
from .fslora import FSLoRAConfig, client_update, run_fslora, server_step
from .merge import dare_merge, linear_merge, merge, slerp, task_arithmetic, ties_merge
from .regmean import regmean_merge
from .tli import alignment, alignment_by_layer, early_layer_lora, tli_loss, train_tli, word_embeddings

__all__ = ["FSLoRAConfig", "run_fslora", "client_update", "server_step", "merge", "linear_merge",
           "task_arithmetic", "ties_merge", "dare_merge", "slerp", "regmean_merge", "word_embeddings",
           "alignment", "alignment_by_layer", "tli_loss", "early_layer_lora", "train_tli"]
