"""cvpipe: a reproducible computer-vision fine-tuning pipeline."""

__version__ = "0.1.0"
