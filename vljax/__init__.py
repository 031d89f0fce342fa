"""vljax: contrastive vision-language pre-training on medical images in JAX."""

__version__ = "0.1.0"
