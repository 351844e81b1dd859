"""Requests become expanded ids plus media tensors; bad requests fail with messages that say what was wrong."""

import numpy as np
import pytest

from vita.errors import ContextLengthError, InvalidInputError
from vita.model.config import VitaConfig
from vita.processing.processor import VitaProcessor
from vita.processing.prompt import Message
from vita.processing.tokenizer import VitaTokenizer


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return VitaProcessor(VitaTokenizer.from_file(tiny_model_dir), VitaConfig.preset("tiny"))


def test_all_modalities_expand_to_the_right_slot_counts(processor, wide_png, short_mp4, speech_wav):
    inputs, stats = processor("Which shape moves?", images=[wide_png], video=short_mp4, audio=[speech_wav])
    ids = inputs.input_ids
    t = processor.tokenizer
    assert inputs.image_pixels.shape == (3, 3, 448, 448)  # 2 tiles + thumbnail
    assert inputs.video_pixels.shape == (6, 3, 448, 448)  # 1.5 s at 4 fps
    assert (ids == t.image_id).sum() == stats.image_tokens == 3 * 256
    assert (ids == t.video_id).sum() == stats.video_tokens == 6 * 256
    n_audio = (ids == t.audio_id).sum().item()
    assert n_audio == stats.audio_tokens
    seconds = inputs.audio_waveforms[0].numel() / 16000
    assert n_audio == pytest.approx(seconds * 12.5, abs=1)
    assert stats.prompt_tokens == ids.numel()
    assert ids[0] == t.bos_id
    # Placeholders were put before the text: image, then video, then audio, then the question.
    text = t.decode(ids.tolist(), skip_special=False)
    assert text.index("<image>") < text.index("<video>") < text.index("<audio>") < text.index("Which shape")


def test_typed_placeholders_are_text(processor, wide_png):
    """`<image>` in the text is those characters: the image still goes before the text, once."""
    inputs, stats = processor("Compare <image> with the text.", images=[wide_png])
    t = processor.tokenizer
    assert (inputs.input_ids == t.image_id).sum() == stats.image_tokens == 3 * 256
    text = t.decode(inputs.input_ids.tolist(), skip_special=False)
    assert text.endswith("<image>\nCompare <image> with the text.</s>\nbot:")


def test_live_camera_frames(processor):
    from PIL import Image

    frames = [(100.0 + k / 30, Image.new("RGB", (64, 48), (k, k, k))) for k in range(60)]  # 2 s at 30 fps
    _, stats = processor("What happens?", video=frames)
    assert stats.video_frames == 8  # under 4 s: 4 frames per second


def test_history_is_part_of_the_prompt(processor):
    history = [Message("user", "Hello"), Message("bot", "Hi there.", state="<3>")]
    inputs, _ = processor("And now?", history=history)
    text = processor.tokenizer.decode(inputs.input_ids.tolist(), skip_special=False)
    assert "user:Hello</s>\nbot:<3>Hi there.</s>\nuser:And now?</s>\nbot:" in text
    assert (inputs.input_ids == processor.tokenizer.state_ids["<3>"]).sum() == 1


def test_history_placeholders_take_their_media_first(processor, speech_wav):
    history = [Message.user(audios=1), Message("bot", "Yes.")]
    inputs, stats = processor("And this?", audio=[speech_wav, speech_wav], history=history)
    assert stats.audio_clips == 2
    ids = inputs.input_ids.tolist()
    starts = [k for k, i in enumerate(ids) if i == processor.tokenizer.audio_id and ids[k - 1] != i]
    assert len(starts) == 2 and len(inputs.audio_waveforms) == 2
    with pytest.raises(InvalidInputError, match="history places 1 audio placeholder"):
        processor("Hi", history=history)


def test_the_system_prompt_follows_the_current_question_not_the_history(processor, speech_wav):
    """Spoken-question system prompt only when the question being answered is spoken: a typed question after a
    spoken turn gets the typed one, as the orchestrator's answer prompt gives it (MISSION.md, "Prompt format")."""
    from vita.processing.prompt import SYSTEM_PROMPTS, DataType

    def system(**kwargs) -> str:
        inputs, _ = processor(**kwargs)
        return processor.tokenizer.decode(inputs.input_ids.tolist(), skip_special=False)

    spoken = SYSTEM_PROMPTS.select(DataType.TEXT, audio_question=True)
    typed = SYSTEM_PROMPTS.select(DataType.TEXT, audio_question=False)
    after_spoken_turn = system(text="And this?", audio=[speech_wav], history=[Message.user(audios=1),
                                                                              Message("bot", "Yes.")])
    assert typed in after_spoken_turn and spoken not in after_spoken_turn
    assert spoken in system(audio=[speech_wav, speech_wav], history=[Message.user(audios=1), Message("bot", "Yes.")])
    assert spoken in system(audio=[speech_wav])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "the request is empty"),
        ({"images": [b"not an image"]}, "image 0"),
        ({"audio": [(np.zeros(0, np.float32), 16000)]}, "audio 0"),
        ({"audio": [(np.full(1600, np.nan, np.float32), 16000)]}, "NaN"),
        ({"audio": [(np.zeros(16000, np.float32), 3)]}, "sample rate"),
        ({"video": []}, "frame"),
        ({"video": b"\x00\x01garbage"}, "video"),
    ],
)
def test_bad_input_is_named(processor, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        processor("" if not kwargs else "hi", **kwargs)


def test_prompt_longer_than_context(processor):
    with pytest.raises(ContextLengthError, match="at most 100 fit the model's context"):
        processor("word " * 200, max_length=100)


def test_typed_placeholder_without_media_is_text(processor):
    inputs, stats = processor("look at <image>")
    ids = inputs.input_ids.tolist()
    assert processor.tokenizer.image_id not in ids and stats.image_tokens == 0
    assert processor.tokenizer.decode(ids).endswith("user:look at <image>\nbot:")


@pytest.mark.parametrize(("preset", "side", "tokens"), [("tiny-224", 224, 64), ("tiny-112", 112, 16)])
def test_one_tile_presets_give_one_tile_per_image_and_frame(tiny_model_dir, wide_png, short_mp4, preset, side, tokens):
    """The learning proof's presets: any image is one tile of `side` pixels (no grid, no thumbnail), `tokens` tokens
    (a quarter of the tile's patches, MISSION.md's pixel shuffle); a video frame too."""
    config = VitaConfig.preset(preset)
    assert (config.vision.image_size, config.vision.tokens_per_tile, config.vision.max_tiles) == (side, tokens, 1)
    processor = VitaProcessor(VitaTokenizer.from_file(tiny_model_dir), config)
    inputs, stats = processor("What is this?", images=[wide_png], video=str(short_mp4))
    assert inputs.image_pixels.shape == (1, 3, side, side)
    assert inputs.video_pixels.shape == (6, 3, side, side)
    assert (stats.image_tokens, stats.video_tokens) == (tokens, 6 * tokens)
    assert VitaConfig.preset("tiny").vision.image_size == 448  # the serving tests' preset is unchanged
