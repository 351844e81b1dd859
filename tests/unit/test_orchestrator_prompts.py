"""The orchestrator's prompts (orchestrator/prompts.py) on the tiny model's real tokenizer and chat template."""

from __future__ import annotations

import pytest

from vita.errors import ContextLengthError
from vita.model.vita import read_model_config
from vita.orchestrator.prompts import (
    alternating,
    answer_prompt,
    history_prompt,
    judge_prefix_prompt,
    judge_prompt,
    media_prompt,
    message,
    placements,
    user_turn,
)
from vita.processing.prompt import Message, StateToken
from vita.processing.tokenizer import VitaTokenizer
from vita.v1.bus_pb2 import EmbeddingRef
from vita.v1.session_pb2 import SessionMedia, SessionTurn

USER, BOT = SessionTurn.USER, SessionTurn.BOT


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> VitaTokenizer:
    return VitaTokenizer.from_file(tiny_model_dir)


@pytest.fixture(scope="module")
def context_len(tiny_model_dir) -> int:
    return read_model_config(tiny_model_dir).llm.max_position_embeddings


def ref(key: str, *item_tokens: int, rows: int | None = None) -> EmbeddingRef:
    """What an encoder reports: the blob's key and shape, and the rows each item contributed."""
    return EmbeddingRef(key=key, shape=[rows if rows is not None else sum(item_tokens), 8], item_tokens=item_tokens)


def media(modality: str, embedding: EmbeddingRef) -> SessionMedia:
    return SessionMedia(modality=modality, embedding=embedding)


def text_of(tok: VitaTokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special=False)


def placed(prompt) -> list[tuple[str, list[tuple[int, int]]]]:
    return [(p.embedding.key, [(s.start, s.length) for s in p.spans]) for p in prompt.placements]


def test_media_prompt_puts_each_item_of_a_blob_on_its_own_span(tok, context_len):
    images, audio = ref("img", 3, 5), ref("aud", 4)
    user = Message.user("What is this?", images=2, audios=1)
    prompt = media_prompt(tok, [user], [media("image", images), media("audio", audio)],
                          audio_question=True, system=None, context_len=context_len)

    (image_key, image_spans), (audio_key, audio_spans) = placed(prompt)
    assert (image_key, audio_key) == ("img", "aud")
    assert [length for _, length in image_spans] == [3, 5] and [length for _, length in audio_spans] == [4]
    assert image_spans[0][0] < image_spans[1][0] < audio_spans[0][0]
    for (start, length), token in [*((s, tok.image_id) for s in image_spans), (audio_spans[0], tok.audio_id)]:
        assert prompt.input_ids[start:start + length] == [token] * length
    assert prompt.input_ids.count(tok.image_id) == 8 and prompt.input_ids.count(tok.audio_id) == 4
    assert text_of(tok, prompt.input_ids).endswith("What is this?</s>\nbot:")
    usage = prompt.usage()
    assert (usage.prompt_tokens, usage.image_tokens, usage.audio_tokens, usage.video_tokens) == (
        len(prompt.input_ids), 8, 4, 0)


def test_media_prompt_uses_the_system_prompt_given_and_refuses_what_does_not_fit(tok, context_len):
    prompt = media_prompt(tok, [Message("user", "hi")], [], audio_question=False, system="Be brief.",
                          context_len=context_len)
    assert text_of(tok, prompt.input_ids) == "<s>system:Be brief.</s>\nuser:hi</s>\nbot:"
    fits = len(prompt.input_ids) + 1  # one position is kept for the answer
    assert media_prompt(tok, [Message("user", "hi")], [], audio_question=False, system="Be brief.",
                        context_len=fits).input_ids == prompt.input_ids
    with pytest.raises(ContextLengthError, match="context"):
        media_prompt(tok, [Message("user", "hi")], [], audio_question=False, system="Be brief.",
                     context_len=fits - 1)


def test_placements_follow_prompt_order_across_turns_and_a_video_takes_one_span(tok, context_len):
    turns = [
        SessionTurn(role=USER, content="first", media=[media("image", ref("a", 2))]),
        SessionTurn(role=BOT, content="one"),
        SessionTurn(role=USER, content="second",
                    media=[media("image", ref("b", 3)), media("video", ref("v", 2, 2, 2))]),
    ]
    prompt = history_prompt(tok, turns, audio_question=False, system=None, context_len=context_len)
    (a, a_spans), (b, b_spans), (v, v_spans) = placed(prompt)
    assert (a, b, v) == ("a", "b", "v")
    assert [length for _, length in a_spans + b_spans + v_spans] == [2, 3, 6]  # the video: all its rows, once
    assert a_spans[0][0] < b_spans[0][0] < v_spans[0][0]
    assert prompt.usage().video_tokens == 6 and prompt.usage().image_tokens == 5
    # The same spans, listed in any order, are handed out the same way.
    assert placements(list(reversed(prompt.spans)), [m for t in turns for m in t.media]) == prompt.placements


def test_alternating_merges_turns_of_one_role_and_drops_a_leading_answer():
    turns = [
        SessionTurn(role=BOT, content="orphan"),
        SessionTurn(role=USER, content="a", media=[media("audio", ref("x", 4))]),
        SessionTurn(role=USER, content="b", media=[media("audio", ref("y", 5))]),  # "a" got no answer
        SessionTurn(role=BOT, content="x"),
        SessionTurn(role=BOT, content="y"),
        SessionTurn(role=USER, content="c"),
    ]
    out = alternating(turns)
    assert [(t.role, t.content) for t in out] == [(USER, "a\nb"), (BOT, "xy"), (USER, "c")]
    assert [m.embedding.key for m in out[0].media] == ["x", "y"]
    assert turns[1].content == "a" and len(turns[1].media) == 1  # the stored turns are left as they were


def test_history_prompt_leaves_out_the_oldest_exchanges_when_the_context_is_full(tok, context_len):
    turns = []
    for i in range(4):
        turns += [SessionTurn(role=USER, content=f"question number {i} about the weather"),
                  SessionTurn(role=BOT, content=f"answer number {i} is sunny")]
    turns.append(SessionTurn(role=USER, content="and tomorrow?"))
    last_two = history_prompt(tok, turns[4:], audio_question=False, system=None, context_len=context_len)
    full = history_prompt(tok, turns, audio_question=False, system=None, context_len=context_len)
    assert len(full.input_ids) > len(last_two.input_ids)

    assert full.turns_dropped == 0
    cut = history_prompt(tok, turns, audio_question=False, system=None, context_len=len(last_two.input_ids) + 1)
    assert cut.input_ids == last_two.input_ids
    assert cut.turns_dropped == 4  # two exchanges, counted in stored turns
    # Turns merged for the template (a question that got no answer) count as the stored turns they were.
    unanswered = [turns[0], *turns]
    assert history_prompt(tok, unanswered, audio_question=False, system=None,
                          context_len=len(last_two.input_ids) + 1).turns_dropped == 5
    text = text_of(tok, cut.input_ids)
    assert "question number 1" not in text and "question number 2" in text and text.endswith("tomorrow?</s>\nbot:")

    with pytest.raises(ContextLengthError):  # not even the last turn fits
        history_prompt(tok, turns[-1:], audio_question=False, system=None, context_len=5)


def test_judge_prompt_shows_the_monitor_the_answer_as_it_stands_then_the_new_speech(tok, context_len):
    history = [SessionTurn(role=USER, media=[media("audio", ref("q", 4))]),
               SessionTurn(role=BOT, content="The square is")]
    speech = ref("new", 6)
    during = judge_prompt(tok, history, speech, answering=" red and", system=None, context_len=context_len)
    text = text_of(tok, during.input_ids)
    assert "bot:The square is</s>\nbot:" not in text  # the answer so far joins the last bot turn
    assert "bot:The square is red and</s>\nuser:" + "<audio>" * 6 + "</s>\nbot:" in text
    assert text.endswith("</s>\nbot:") and "speech" in text.split("</s>")[0]  # an audio question's system prompt
    key, [(start, length)] = placed(during)[-1]
    assert (key, length) == ("new", 6) and during.input_ids[start:start + length] == [tok.audio_id] * 6
    assert start == max(s.start for s in during.spans)  # the new speech is the last thing in the prompt

    idle = judge_prompt(tok, history[:1], speech, answering=None, system=None, context_len=context_len)
    assert text_of(tok, idle.input_ids).count("user:") == 1  # two user turns in a row are one
    assert [k for k, _ in placed(idle)] == ["q", "new"]


@pytest.mark.parametrize("system", [None, "You are a helpful robot."])
@pytest.mark.parametrize("history", ["spoken", "an image shown", "interrupted"])
def test_judge_prefix_prompt_is_where_every_later_judgement_starts(tok, context_len, system, history):
    turns = [SessionTurn(role=USER, media=[media("audio", ref("q1", 5))]),
             SessionTurn(role=BOT, content="It is a red square.")]
    if history == "an image shown":  # the media set the system prompt: the prefix must pick the judgement's
        turns[0].media.insert(0, media("image", ref("img", 16)))
    elif history == "interrupted":
        turns += [SessionTurn(role=USER, content="stop"), SessionTurn(role=BOT, content="Sure", interrupted=True)]
    prefix = judge_prefix_prompt(tok, turns, system=system, context_len=context_len)
    assert text_of(tok, prefix.input_ids).endswith("</s>")  # the history's end, no bot tag

    idle = judge_prompt(tok, turns, ref("next", 6), answering=None, system=system, context_len=context_len)
    later = [*turns, SessionTurn(role=USER, content="more"), SessionTurn(role=BOT, content="Yes")]
    answering = judge_prompt(tok, later, ref("next", 6), answering="and th", system=system, context_len=context_len)
    for judged in (idle, answering):
        n = len(prefix.input_ids)
        assert judged.input_ids[:n] == prefix.input_ids and len(judged.input_ids) > n
        assert placed(judged)[:len(prefix.placements)] == placed(prefix)
    # After a user turn the next speech joins that turn: no prefix of the judgement ends there.
    with pytest.raises(ValueError, match="ends with an answer"):
        judge_prefix_prompt(tok, [*turns, SessionTurn(role=USER, content="hm")], system=system,
                            context_len=context_len)


@pytest.mark.parametrize(("state", "audio"), [(StateToken.TEXT, False), (StateToken.QUERY_AUDIO, True)])
def test_answer_prompt_ends_with_the_decided_state_token(tok, context_len, state, audio):
    refs = {"audio": ref("a", 4)} if audio else {}
    user = user_turn("" if audio else "What colour?", refs, turn_id=3, state=state, unix_s=1.0)
    history = [SessionTurn(role=USER, content="hello"), SessionTurn(role=BOT, content="hi")]
    prompt = answer_prompt(tok, history, user, state, system=None, context_len=context_len)
    assert prompt.input_ids[-1] == tok.state_ids[state.value]
    assert prompt.usage().prompt_tokens == len(prompt.input_ids)
    text = text_of(tok, prompt.input_ids[:-1])
    assert text.endswith("bot:") and "user:hello</s>\nbot:hi</s>\n" in text
    assert ("speech" in text.split("</s>")[0]) == audio


def test_user_turn_gives_each_encoded_item_a_placeholder():
    refs = {"audio": ref("a", 4), "video": ref("v", 9), "image": ref("i", 3, 3)}
    turn = user_turn("What changed?", refs, turn_id=7, state=StateToken.TEXT, unix_s=2.0)
    assert turn.content == "What changed?"  # stored as typed; the media say which placeholders go before it
    assert [(m.modality, m.embedding.key) for m in turn.media] == [("image", "i"), ("video", "v"), ("audio", "a")]
    assert (turn.role, turn.turn_id, turn.state_token, turn.unix_s) == (USER, 7, "<3>", 2.0)
    assert message(turn) == Message("user", "What changed?", ("image", "image", "video", "audio"))


def test_typed_placeholders_are_text_not_media(tok, context_len):
    """`<image>` typed in a turn does not place an image: the turn's media go before its text, typed or not."""
    typed = user_turn("<image> left, <image> right <1>", {"image": ref("i", 3, 3)}, turn_id=1,
                      state=StateToken.TEXT, unix_s=0.0)
    assert typed.content == "<image> left, <image> right <1>"
    prompt = answer_prompt(tok, [], typed, StateToken.TEXT, system=None, context_len=context_len)
    assert prompt.input_ids.count(tok.image_id) == 6 and prompt.usage().image_tokens == 6
    assert [tok.state_ids["<3>"]] == [i for i in prompt.input_ids if i in tok.state_ids.values()]
    assert tok.decode(prompt.input_ids).endswith("user:\n\n<image> left, <image> right <1>\nbot:")
