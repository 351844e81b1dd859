"""`token_budget`: the one max_tokens rule of the orchestrator, the pipeline and the decode loop."""

import pytest

from vita.model.generation import token_budget


@pytest.mark.parametrize(("requested", "prompt_len", "context_len", "budget"), [
    (10, 5, 64, 10),  # room to spare: what was asked
    (100, 60, 64, 4),  # cut to the context left after the prompt
    (4, 60, 64, 4),  # exactly the room left
    (5, 63, 64, 1),
    (5, 64, 64, 1),  # never below one token
    (1, 0, 64, 1),
])
def test_budget_is_the_request_cut_to_the_room_left(requested, prompt_len, context_len, budget):
    assert token_budget(requested, prompt_len, context_len) == budget
