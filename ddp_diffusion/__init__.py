"""ddp-diffusion: a distributed trainer for class-conditional diffusion models."""

__version__ = "0.1.0"
