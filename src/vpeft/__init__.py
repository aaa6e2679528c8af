"""vpeft: parameter-efficient fine-tuning of pre-trained vision models."""

__version__ = "0.1.0"
