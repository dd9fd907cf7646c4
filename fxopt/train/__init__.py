"""Recovery training: finetune and distillation loops, data parallelism, checkpoints."""
from .finetune import FinetuneHistory, finetune

__all__ = ["FinetuneHistory", "finetune"]
