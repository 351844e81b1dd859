"""The duplex fine-tune (vita/training/duplex.py): the tiny model really learns to judge speech with its first token.

The checkpoint is the shared `duplex_model_dir` (trained once, cached in VITA_HOME, used by the serving tests too).
Every judgement here goes through the monitor prompt the orchestrator builds, on speech and noise that training
never saw (vita.training.speech's held-out phrases and noise seeds).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from vita.inference import VitaPipeline
from vita.model.inputs import MultimodalInputs
from vita.model.vita import VitaForCausalLM
from vita.processing.audio import audio_features
from vita.processing.image import preprocess_image
from vita.processing.prompt import Message, StateToken
from vita.processing.tokenizer import VitaTokenizer
from vita.processing.vad import speech_segments
from vita.training import duplex, speech

pytestmark = pytest.mark.slow

PASS = {"query": 0.9, "other": 0.9, "noise": 0.8}  # per kind: 9 of 10 phrases, 16 of the 20 noise bursts
# An earlier exchange: a typed question, and an answer that was interrupted half-way.
TEXT_TURN = [Message("user", "What colour is the square?"), Message("bot", duplex.ANSWER[:150].rstrip())]
# An earlier spoken question (its clip is passed as history_audio) and its whole answer.
SPOKEN_TURN = [Message.user(audios=1), Message("bot", duplex.ANSWER)]


@pytest.fixture(scope="module")
def pipeline(duplex_model_dir) -> VitaPipeline:
    return VitaPipeline.load(duplex_model_dir)


@pytest.fixture(scope="module")
def clips() -> list[speech.Clip]:
    """10 held-out questions, 10 held-out asides in other voices, 20 noise bursts (5 left the noise rate too coarse:
    one burst was 20%)."""
    held_out = speech.held_out_clips(n_noise=20)
    assert [c.kind for c in held_out].count("query") >= 10 and [c.kind for c in held_out].count("other") >= 10
    return held_out


@pytest.fixture(scope="module")
def earlier_question() -> np.ndarray:
    return speech.espeak(speech.QUERY_HELD_OUT[0])


@pytest.mark.parametrize("turns", ["none", "typed", "spoken"])
@pytest.mark.parametrize("with_image", [False, True], ids=["no-image", "image"])
def test_held_out_speech_is_judged_right(pipeline, clips, earlier_question, turns, with_image):
    history = {"none": [], "typed": TEXT_TURN, "spoken": SPOKEN_TURN}[turns]
    accuracy = duplex.evaluate(pipeline, None, clips, history=history,
                               image=duplex.synthetic_image(4242) if with_image else None,
                               history_audio=[earlier_question] if turns == "spoken" else ())
    assert set(accuracy) == set(PASS)
    assert all(accuracy[kind] >= PASS[kind] for kind in PASS), accuracy


def test_untrained_model_fails_the_same_check(tiny_model_dir, clips):
    """The random tiny model is judged by the same check and fails it: the check measures the training."""
    accuracy = duplex.evaluate(VitaPipeline.load(tiny_model_dir), None, clips)
    assert not all(accuracy[kind] >= PASS[kind] for kind in PASS), accuracy


def test_answer_follows_the_query_token(pipeline, clips, earlier_question):
    tokenizer = pipeline.tokenizer
    answer = tokenizer.encode(duplex.ANSWER)
    assert 100 <= len(answer) <= 120  # long enough for the serving tests to cut it half-way
    query = next(c for c in clips if c.query)
    for kwargs in ({}, {"history": SPOKEN_TURN, "history_audio": [earlier_question],
                        "image": duplex.synthetic_image(7)}):
        ids = duplex.generate_after_state(pipeline, None, query.samples, StateToken.QUERY_AUDIO, **kwargs)
        assert ids[:20] == answer[:20], tokenizer.decode(ids)
        assert len(ids) >= 100  # no early stop


@pytest.mark.parametrize("with_history", [False, True], ids=["first-turn", "after-spoken-turn"])
def test_a_typed_question_is_answered_after_the_text_token(pipeline, earlier_question, with_history):
    """A typed message, as the orchestrator answers it (`user:...</s>\nbot:<3>`), on a question training never
    typed: the answer, not silence."""
    answer = pipeline.tokenizer.encode(duplex.ANSWER)
    kwargs = {"history": SPOKEN_TURN, "history_audio": [earlier_question]} if with_history else {}
    ids = duplex.generate_after_state(pipeline, None, None, StateToken.TEXT, text="Hello there", **kwargs)
    assert ids[:20] == answer[:20], pipeline.tokenizer.decode(ids)


def test_eos_follows_the_noisy_token(pipeline, clips):
    for clip in [c for c in clips if not c.query][::3]:
        ids = duplex.generate_after_state(pipeline, None, clip.samples, StateToken.NOISY_AUDIO, max_new_tokens=2)
        assert ids == [pipeline.tokenizer.eos_id], clip.text


def test_vad_segments_are_judged_like_the_whole_clips(pipeline, clips):
    """What the orchestrator judges: Silero VAD segments (and the early partial cuts) of speech in silence.

    Every whole segment is judged right, and no early cut of an aside is taken for a query (that would cut off
    the answer being spoken). An early cut of a query may be missed: its first 0.7 s can be the very words an
    aside starts with ("can you c..." of "can you count the apples" and of "can you pick up the kids after
    school"), and the orchestrator judges the segment again when it ends (docs/serving.md). Measured on this
    machine: 1 of the 18 early cuts of the held-out questions missed, that one.
    """
    from vita.processing.vad import StreamingVAD

    silence = np.zeros(speech.SAMPLE_RATE // 2, np.float32)
    early_queries: list[bool] = []
    for clip in [c for c in clips if c.kind != "noise"]:
        vad = StreamingVAD()
        events = vad.push(np.concatenate([silence, clip.samples, silence, silence])) + vad.flush()
        cuts = [e for e in events if e.kind in ("partial", "ended")]
        assert cuts and cuts[-1].kind == "ended", f"no speech segment in {clip.text!r}"
        want = StateToken.QUERY_AUDIO if clip.query else StateToken.NOISY_AUDIO
        judged = [duplex.judge(pipeline, None, cut.audio) for cut in cuts]
        assert judged[-1] == want, clip.text
        if clip.query:
            early_queries += [j == want for j in judged[:-1]]
        else:
            assert judged == [want] * len(cuts), clip.text
    assert len(early_queries) >= 10 and sum(early_queries) >= 0.9 * len(early_queries), early_queries


def test_silero_vad_hears_the_other_speech_as_speech():
    """Asides must reach the monitor at all: Silero VAD (its own API and our segmenter) detects them as speech."""
    threads = torch.get_num_threads()
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad  # sets torch threads to 1 on import

        model = load_silero_vad()
    finally:
        torch.set_num_threads(threads)
    asides = [speech.espeak(t, v) for t, v in (*speech.OTHER_TRAIN, *speech.OTHER_HELD_OUT)]
    for voice in ("en-high", "de", "fr"):
        assert any(v == voice for _, v in speech.OTHER_HELD_OUT)
    for samples in asides:
        stamps = get_speech_timestamps(torch.from_numpy(samples), model, sampling_rate=speech.SAMPLE_RATE)
        heard = sum(s["end"] - s["start"] for s in stamps) / speech.SAMPLE_RATE
        assert heard >= 0.5 * len(samples) / speech.SAMPLE_RATE
        assert len(speech_segments(samples)) >= 1


@pytest.mark.parametrize("typed", [False, True], ids=["spoken", "typed"])
def test_training_embeds_what_inference_embeds(tiny_model_dir, typed):
    """A training sample's prompt is the processor's (spoken: the monitor request; typed: the text query), and its
    embeddings are `embed_multimodal`'s."""
    model = VitaForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = VitaTokenizer.from_file(tiny_model_dir)
    config = duplex.DuplexTrainConfig(p_image=1.0, history_turns=(0.0, 0.0, 1.0), p_text=0.5)
    data = duplex.DuplexData(tokenizer, model, config)
    sample = next(s for s in iter(data.sample, None) if len(s.audios) > 1 and "image" in s.messages[-1].media
                  and ("audio" not in s.messages[-1].media) == typed)
    n_prompt = sample.labels.index(next(label for label in sample.labels if label != -100))

    inputs, _ = VitaPipeline(model, tokenizer, tiny_model_dir).processor(**duplex.monitor_inputs(
        None if typed else sample.audios[-1], sample.messages[:-1], duplex.synthetic_image(sample.images[0]),
        history_audio=sample.audios if typed else sample.audios[:-1], text=sample.messages[-1].content))
    # A typed message is answered after `bot:<3>`, which the orchestrator appends (`answer_prompt`): not a target
    want = inputs.input_ids.tolist() + [tokenizer.state_ids["<3>"]] * typed
    assert sample.input_ids[:n_prompt] == want
    assert sample.labels[n_prompt] in ((tokenizer.encode(duplex.ANSWER)[0],) if typed else
                                       (tokenizer.state_ids["<1>"], tokenizer.state_ids["<2>"]))

    images = duplex.image_bank(model, config.n_images, config.seed)
    pixels = preprocess_image(duplex.synthetic_image(config.seed * 1000 + sample.images[0]), model.vita_config.vision)
    reference = model.embed_multimodal(
        MultimodalInputs(torch.tensor(sample.input_ids), image_pixels=pixels,
                         audio_features=audio_features([torch.from_numpy(a) for a in sample.audios],
                                                       model.vita_config.audio)),
        VitaPipeline(model, tokenizer, tiny_model_dir).processor.slot_ids)
    with torch.no_grad():
        trained = duplex.embed_sample(model, sample, images, tokenizer)
    torch.testing.assert_close(trained, reference, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic(tiny_model_dir):
    def run() -> dict[str, torch.Tensor]:
        model = VitaForCausalLM.from_pretrained(tiny_model_dir)
        tokenizer = VitaTokenizer.from_file(tiny_model_dir)
        duplex.train_duplex(model, tokenizer, duplex.DuplexTrainConfig(steps=2, batch_size=2), progress=False)
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["lm_head.weight"], VitaForCausalLM.from_pretrained(tiny_model_dir).lm_head.weight)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "vita.training.duplex", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--output", "--steps", "--overwrite"):
        assert flag in out
