"""The package sets libgomp's spin count before torch loads (services/vita/__init__.py): a busy machine must not
slow every parallel region down to a scheduler slice. An explicit value in the environment wins."""

import os
import subprocess
import sys

CODE = "import vita, torch, os; print(os.environ['GOMP_SPINCOUNT'])"


def _spincount(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_package_sets_a_short_spin_and_an_explicit_value_wins():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _spincount(env) == "1000"
    assert _spincount({**env, "GOMP_SPINCOUNT": "5"}) == "5"
