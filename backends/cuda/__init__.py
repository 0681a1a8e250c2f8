"""PyTorch/CUDA backend: diffusers/transformers/PEFT models, accelerate for data parallelism."""
from .pipeline import Pipeline
from .trainer import Trainer

__all__ = ["Pipeline", "Trainer"]
