"""llark: an instruction-tuned music language model built from open music datasets."""

__version__ = "0.1.0"
