"""vlm-mig: RL fine-tuning of (vision-)language models with step-wise Marginal Information Gain."""

__version__ = "0.1.0"
