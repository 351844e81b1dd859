"""vita.training.cpu: the stand-in pretraining commands flush denormal floats to zero and give the caller's
setting back; benchmarks/denormals.py compares both."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

from vita.training.cpu import denormals_flushed, flushing_denormals


@pytest.fixture(autouse=True)
def _denormals_computed():
    assert torch.set_flush_denormal(False), "this CPU cannot flush denormals"
    yield
    torch.set_flush_denormal(False)


def test_flushed_inside_and_the_callers_setting_restored_after() -> None:
    with denormals_flushed():
        assert flushing_denormals()
    assert not flushing_denormals()
    with pytest.raises(ValueError), denormals_flushed():
        raise ValueError("boom")
    assert not flushing_denormals()
    torch.set_flush_denormal(True)  # a caller that flushes already keeps flushing
    with denormals_flushed():
        pass
    assert flushing_denormals()


def test_the_command_trains_flushed_and_the_benchmark_says_which_setting_ran(capsys) -> None:
    """The benchmark's "flushed" row runs `vita pretrain-vision` through `vita.cli.main` in a fresh interpreter and
    records the setting at every training step; the "computed" row calls the function as the command did before."""
    denormals = load_benchmark("denormals")
    assert denormals.main(["--no-write", "--steps", "10", "--pictures", "64", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| computed", "| flushed"))]
    assert [row.split("|")[1:3] for row in rows] == [[" computed ", " False "], [" flushed ", " True "]]
