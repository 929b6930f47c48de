"""distill: teacher -> student distillation pipeline for small-GPU serving."""

__version__ = "0.1.0"
