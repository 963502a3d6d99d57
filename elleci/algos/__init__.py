"""Post-training objectives and loops (one file per technique; see DESIGN.md §5).

Losses are pure functions of log-prob tensors returning `(loss, metrics)`; they are re-exported here
as they land. This package imports on any machine (CPU, no Triton).
"""
__all__: list[str] = []
