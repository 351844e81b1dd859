"""vita.training.cpu: training processes flush denormal floats to zero; benchmarks/denormals.py compares both."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vita.training.cpu import configure_cpu

ROOT = Path(__file__).resolve().parents[2]
DENORMAL = 1e-39  # below float32's smallest normal number (1.18e-38)


def _flushing() -> bool:
    return (torch.tensor([DENORMAL]) * 1.0).item() == 0.0


def test_configure_cpu_sets_the_threads_and_flushes_denormals() -> None:
    threads = torch.get_num_threads()
    assert torch.set_flush_denormal(False), "this CPU cannot flush denormals"
    try:
        assert not _flushing()
        configure_cpu(1)
        assert _flushing()
        assert torch.get_num_threads() == 1
        configure_cpu(None)  # keeps the thread count, still flushes
        assert torch.get_num_threads() == 1 and _flushing()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def test_the_benchmark_runs_both_settings_and_says_which_was_in_effect(capsys) -> None:
    spec = importlib.util.spec_from_file_location("denormals", ROOT / "benchmarks" / "denormals.py")
    denormals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(denormals)
    assert denormals.main(["--no-write", "--steps", "10", "--pictures", "64", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| computed", "| flushed"))]
    assert [row.split("|")[1:3] for row in rows] == [[" computed ", " False "], [" flushed ", " True "]]
