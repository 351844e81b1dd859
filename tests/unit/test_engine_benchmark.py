"""benchmarks/llm_engine.py at small size: its judge prompts, and the judge-prefix table with every column."""

import pytest
import torch
from conftest import load_benchmark

from vita.model.config import VitaConfig
from vita.model.llm import MoECausalLM


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("llm_engine")


def test_the_prefilled_history_is_where_the_next_judgement_starts(bench):
    model = MoECausalLM(VitaConfig.preset("tiny").llm)
    args = bench.parse_args(["--turns", "4", "--speech-tokens", "5", "--answer-tokens", "7", "--system-tokens", "9"])
    conv = bench.conversation(model, args, seed=0)
    for turn in range(2, 5):
        history, judged = bench.judge_prompt(conv, turn, history_only=True), bench.judge_prompt(conv, turn)
        n = history.input_ids.numel()
        assert n == 9 + (turn - 1) * (5 + 6 + 7)  # the system prompt and the exchanges before this turn
        assert torch.equal(judged.input_ids[:n], history.input_ids) and judged.input_ids.numel() == n + 5 + 3
        # The speech rows of the history are the judgement's first ones, at the same positions.
        k = history.slot_positions.numel()
        assert torch.equal(judged.slot_positions[:k], history.slot_positions)
        assert torch.equal(judged.slot_embeddings[:k], history.slot_embeddings) and judged.slot_embeddings.shape[0] == k + 5
        assert torch.equal(judged.slot_identity[:k], history.slot_identity)  # each turn's speech named by its digest
        assert judged.slot_identity[:, :2].unique(dim=0).shape[0] == turn and bench.judge_prompt(
            conv, turn, hash_rows=True).slot_identity is None
    # Every conversation starts with the same system prompt, as every session does in serving; the turns differ.
    other = bench.conversation(model, args, seed=1)
    assert torch.equal(other.system, conv.system) and not torch.equal(other.turns[0][2], conv.turns[0][2])


def test_judge_prefix_table_has_caching_off_on_and_on_with_the_history_prefilled(bench, capsys):
    argv = ["--scenario", "judge-prefix", "--threads", "1", "--turns", "3", "--repeats", "1", "--context", "1024",
            "--long-prompt", "100", "--no-write"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| turn |"))
    assert header.split("|")[3:7] == [" prefix caching off ms ", " prefix caching on ms ",
                                      " prefix caching on, history prefilled, rows hashed ms ",
                                      " prefix caching on, history prefilled ms "]
    ratio = next(line for line in out.splitlines() if line.startswith("| turn 3 / the fresh turn 1"))
    assert [cell.strip().endswith("x") for cell in ratio.split("|")[3:7]] == [True] * 4
