"""Torch modules, configs and checkpoint I/O."""

from vita.model.config import AudioConfig, LLMConfig, VisionConfig, VitaConfig

__all__ = ["AudioConfig", "LLMConfig", "VisionConfig", "VitaConfig"]
