"""Benchmark names for the CLI (importing this is cheap) and their implementations (imported on use)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vita.eval.core import Benchmark

_WHERE = {
    "curriculum": ("vita.eval.curriculum", "BENCHMARK"),
    "librispeech": ("vita.eval.speech", "LIBRISPEECH"),
    "wenetspeech": ("vita.eval.speech", "WENETSPEECH"),
    "mme": ("vita.eval.vision", "MME"),
    "ocrbench": ("vita.eval.vision", "OCRBENCH"),
    "hallusionbench": ("vita.eval.vision", "HALLUSIONBENCH"),
    "videomme": ("vita.eval.vision", "VIDEOMME"),
    "ceval": ("vita.eval.text", "CEVAL"),
    "agieval": ("vita.eval.text", "AGIEVAL"),
    "mmlu": ("vita.eval.text", "MMLU"),
    "gsm8k": ("vita.eval.text", "GSM8K"),
}
NAMES = tuple(_WHERE)


def get(name: str) -> Benchmark:
    module, attribute = _WHERE[name]
    return getattr(importlib.import_module(module), attribute)
