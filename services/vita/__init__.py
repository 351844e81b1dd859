"""VITA-style interactive omni-modal LLM: model core, processing, services and training."""

__version__ = "0.1.0"
