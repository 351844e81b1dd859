"""Build hook: every wheel or install made from this tree contains the generated gRPC code, `vita.v1`.

`vita/v1` is generated from ../protos (not committed); `build_protos.generate()` makes it when it is missing or
stale, before setuptools looks for packages. Everything else is declared in pyproject.toml.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_protos import generate

try:
    generate()
except RuntimeError as e:
    sys.exit(f"vita-omni: {e}")

setup()
