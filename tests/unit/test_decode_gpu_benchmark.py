"""benchmarks/llm_decode_gpu.py on CPU at tiny size: the table a lent GPU would fill, and its bound's arithmetic."""

import math

import pytest
from conftest import load_benchmark

from vita.model.config import VitaConfig
from vita.model.llm import MoECausalLM


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("llm_decode_gpu")


def test_tiny_run_fills_every_row_and_both_decoders_give_the_same_greedy_tokens(bench, capsys, monkeypatch):
    # Off CUDA the Triton MoE kernel runs only under its interpreter, 100x slower: tests/unit/test_fused_moe.py
    # checks its decode; here its row is left out and the report says why.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["--device", "cpu", "--preset", "tiny", "--dtype", "fp32", "--no-write", "--prompt-len", "8",
            "--new-tokens", "6", "--repeats", "1", "--batches", "1", "2", "--encoder-batch", "1",
            "--audio-seconds", "1", "--audio-batch", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    graphed = "graph path, eager off CUDA"
    assert {"decode, batch 1", "decode, batch 2", f"decode, batch 1, {graphed}", f"decode, batch 2, {graphed}"} <= set(rows)
    for batch in (1, 2):
        bound = float(rows[f"decode, batch {batch}"][4].replace(",", ""))
        assert bound > 0
        assert float(rows[f"decode, batch {batch}, {graphed}"][1].replace(",", "")) > 0
    # fp32, the same weights converted from transformers' layout into ours: the same greedy tokens
    assert "the first 6 of 6 are the same in both" in out
    assert "gives the same greedy tokens of batch 1 as our eager decode" in out
    assert "The Triton MoE kernel was not run (no Triton on this device" in out
    assert not any("fused MoE kernel" in label for label in rows)
    assert float(rows["vision encoder (448 px tiles, batch 1)"][1].replace(",", "")) > 0
    assert float(rows["audio encoder (1 s clips, batch 1)"][1].replace(",", "")) > 0
    assert "GB/s** (read + written)" in out


def test_step_bytes_count_the_weights_a_step_reads(bench):
    """Every parameter but the embedding table (one row per token) and the experts top-2 routing does not reach:
    2 of 8 for one token, all but a (3/4)^B share of them for B tokens; plus the KV cache."""
    config = VitaConfig.preset("tiny").llm
    model = MoECausalLM(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("moe.w1", "moe.w2", "moe.w3")))
    rest = sum(p.numel() for n, p in model.named_parameters()
               if "embed_tokens" not in n and not n.endswith(("moe.w1", "moe.w2", "moe.w3")))
    H = config.hidden_size
    assert bench.step_bytes(config, 1, 0, 4) == pytest.approx(4 * (rest + experts * 2 / 8 + H))
    touched = 1 - 0.75**8
    kv = 2 * config.num_hidden_layers * 8 * 100 * config.num_key_value_heads * config.head_dim
    assert bench.step_bytes(config, 8, 100, 2) == pytest.approx(2 * (rest + experts * touched + 8 * H + kv))
    assert math.isclose(bench.step_bytes(config, 10**6, 0, 1) - 10**6 * H, rest + experts, rel_tol=1e-6)


def test_bad_settings_are_one_line_errors(bench, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--device", "cpu", "--new-tokens", "1"])
    assert stopped.value.code == 2
    assert "--new-tokens >= 2" in capsys.readouterr().err
