"""The synthetic curriculum: every manifest valid, answers short and right about the media, seeded, held out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vita.processing.audio import load_audio
from vita.processing.video import decode_video
from vita.training.curriculum import (
    ASIDE_QUESTIONS,
    CATEGORIES,
    CHATTER_VOICES,
    COLOURS,
    NUMBER_WORDS,
    QUERY_VOICES,
    QUESTION_TASKS,
    CurriculumSizes,
    build_curriculum,
    grid_cell,
    tree_digest,
)
from vita.training.data import read_manifest

SMALL = CurriculumSizes.test()


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_curriculum(tmp_path_factory.mktemp("curriculum") / "c", seed=0, sizes=SMALL)


def test_every_manifest_is_valid_and_sized(curriculum: dict[str, Path]) -> None:
    assert set(curriculum) == {f"{split}/{c}" for split in ("train", "heldout") for c in CATEGORIES}
    for name, path in curriculum.items():
        split, category = name.split("/")
        samples = read_manifest(path)  # checks placeholders against media and that every file exists
        asides = SMALL.asides if name == "train/chatter" else 0
        assert len(samples) == SMALL.count(category, split) + asides, name
        for s in samples:
            # answers are one or two words, captions three ("a high beep"), transcripts template sentences ("the
            # yellow chair is in front of the bird": 9)
            longest = {"asr": 9, "caption": 3}.get(category, 2)
            assert len(s.answer.split()) <= longest and "</s>" not in s.answer, s.answer
            assert s.meta["category"] == category
    info = json.loads((curriculum["train/image"].parent.parent / "curriculum.json").read_text())
    assert info["seed"] == 0 and info["counts"]["train/image"] == SMALL.image


def test_states_follow_the_categories(curriculum: dict[str, Path]) -> None:
    states = {c: {s.state for s in read_manifest(curriculum[f"train/{c}"])} for c in CATEGORIES}
    assert states == {"image": {"<3>"}, "video": {"<3>"}, "spoken": {"<1>"}, "chatter": {"<2>"}, "asr": {None},
                      "caption": {None}, "text": {"<3>"}}
    for s in read_manifest(curriculum["train/chatter"]):
        assert s.answer == "" and s.kind == "duplex"
    for s in read_manifest(curriculum["train/spoken"]):
        assert s.meta["voice"] in QUERY_VOICES and s.answer


def _asked(sample) -> list[tuple[str, str]]:
    """(task, answer) for every question of a conversation, the task found from the question's wording."""
    turns = sample.conversation
    return [(QUESTION_TASKS[q["content"].rsplit("\n", 1)[-1]], a["content"]) for q, a in zip(turns[0::2], turns[1::2])]


def _shape_centre(frame: Image.Image) -> tuple[float, float]:
    """(x, y) in pixels: the mean of a decoded frame's pixels far from its background (the median colour)."""
    pixels = np.asarray(frame.convert("RGB")).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - np.median(pixels.reshape(-1, 3), axis=0)).sum(axis=2) > 60)
    return xs.mean(), ys.mean()


def test_pictures_show_what_the_answers_say(curriculum: dict[str, Path]) -> None:
    for s in read_manifest(curriculum["train/image"]) + read_manifest(curriculum["heldout/image"]):
        image = np.asarray(Image.open(s.images[0]).convert("RGB")).reshape(-1, 3).astype(int)
        assert Image.open(s.images[0]).size == (448, 448)
        for task, answer in _asked(s):
            if task == "colour":  # the shape's (or word's) pixels are exactly the named colour
                assert (np.abs(image - COLOURS[answer]).sum(axis=1) == 0).sum() > 200, answer


def _blobs(mask: np.ndarray) -> int:
    """Connected regions (4-neighbour) of a boolean mask."""
    seen, blobs = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blobs += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return blobs


def test_pictures_hold_as_many_shapes_as_their_count_answer(curriculum: dict[str, Path]) -> None:
    checked = 0
    for s in read_manifest(curriculum["train/image"]):
        answers = dict(_asked(s))
        if "count" in answers:
            pixels = np.asarray(Image.open(s.images[0]).convert("RGB")).astype(int)
            mask = np.abs(pixels - COLOURS[answers["colour"]]).sum(axis=-1) == 0
            assert _blobs(mask) == NUMBER_WORDS.index(answers["count"]), (s.images[0], answers)
            checked += 1
    assert checked


def test_training_pictures_are_asked_every_question_they_answer(curriculum: dict[str, Path]) -> None:
    """One conversation per training picture or clip, the drawn task first; held-out samples ask one question."""
    for s in read_manifest(curriculum["train/image"]):
        asked = _asked(s)
        assert asked[0][0] == s.meta["task"]
        expected = {"colour", "word"} if s.meta["task"] == "word" or "word" in dict(asked) else {
            "colour", "shape", "count"}
        assert sorted(t for t, _ in asked) == sorted(expected), asked
    for s in read_manifest(curriculum["train/video"]):  # and, last, where the shape starts and ends
        asked = _asked(s)
        assert sorted(t for t, _ in asked[:3]) == ["colour", "direction", "shape"]
        assert [t for t, _ in asked[3:]] == ["start", "end"]
    for s in read_manifest(curriculum["train/spoken"]):
        if s.meta["medium"] in ("image", "video"):  # every question spoken, one recording each
            assert len(s.audio) == len(s.conversation) // 2 >= 2
    for name in ("heldout/image", "heldout/video", "heldout/spoken"):
        assert all(len(s.conversation) == 2 for s in read_manifest(curriculum[name])), name
    single = build_curriculum(curriculum["train/image"].parent.parent.parent / "single", seed=0,
                              sizes={**dataclasses.asdict(SMALL), "follow_up_questions": False})
    assert all(len(s.conversation) == 2 for s in read_manifest(single["train/image"]))
    assert all(len(s.conversation) == 2 for s in read_manifest(single["train/video"]))


def test_clip_positions_name_the_cells_of_the_first_and_last_sampled_frames(curriculum: dict[str, Path]) -> None:
    """The start and end answers are where the decoded clip's first and last sampled frames show the shape (a 3 x 3
    grid), and they agree with the direction: a clip moving right starts on the left and ends on the right."""
    opposite = {"left": "right", "right": "left", "up": "bottom", "down": "top"}
    side = {"left": "left", "right": "right", "up": "top", "down": "bottom"}
    for s in read_manifest(curriculum["train/video"]):
        answers = dict(_asked(s))
        clip = decode_video(s.video)
        for when, frame in (("start", clip.frames[0]), ("end", clip.frames[-1])):
            (x, y), third = _shape_centre(frame), frame.width / 3
            if min(abs(v - k * third) for v in (x, y) for k in (1, 2)) > 8:  # the ink's centre is not the drawn one
                assert grid_cell(x, y, frame.width) == answers[when], (s.video, when)
        assert opposite[answers["direction"]] in answers["start"].split()
        assert side[answers["direction"]] in answers["end"].split()
    assert [grid_cell(x, y, 90) for y in (10, 50, 80) for x in (10, 50, 80)] == [
        "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]


def test_clips_move_the_way_the_answer_says(curriculum: dict[str, Path]) -> None:
    samples = read_manifest(curriculum["train/video"]) + read_manifest(curriculum["heldout/video"])
    for s in samples:
        clip = decode_video(s.video)
        assert len(clip.frames) == 4  # 1 s clips: sampled at 4 frames per second
        direction = dict(_asked(s)).get("direction")
        if direction is None:
            continue
        centres = [_shape_centre(frame) for frame in clip.frames]
        dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == direction


def test_speech_is_16k_and_chatter_uses_other_voices(curriculum: dict[str, Path]) -> None:
    chatter = read_manifest(curriculum["train/chatter"])
    other_voices = {v for vs in CHATTER_VOICES.values() for v in vs}
    for s in chatter:
        samples = load_audio(s.audio[0])
        assert 0.5 < len(samples) / 16000 < 8
        if s.meta["task"] == "speech":
            assert s.meta["voice"] in other_voices
    asr = read_manifest(curriculum["train/asr"])
    assert all(s.answer == s.answer.lower() and s.answer.replace(" ", "").isalpha() for s in asr)


def test_the_held_out_split_repeats_no_training_content(curriculum: dict[str, Path]) -> None:
    def texts(name: str, key) -> set[str]:
        return {key(s) for s in read_manifest(curriculum[name])}

    assert not texts("train/asr", lambda s: s.answer) & texts("heldout/asr", lambda s: s.answer)
    spoken_text = lambda s: s.meta["question"] if s.meta.get("task") == "arithmetic" else None  # noqa: E731
    assert not (texts("train/spoken", spoken_text) & texts("heldout/spoken", spoken_text)) - {None}
    phrase = lambda s: s.meta.get("text")  # noqa: E731
    assert not (texts("train/chatter", phrase) & texts("heldout/chatter", phrase)) - {None}
    train_images = {Path(p).read_bytes() for s in read_manifest(curriculum["train/image"]) for p in s.images}
    assert not train_images & {Path(p).read_bytes() for s in read_manifest(curriculum["heldout/image"])
                               for p in s.images}


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    sizes = {"image": 3, "video": 2, "spoken": 4, "chatter": 3, "asr": 2, "caption": 2, "text": 3, "heldout": 0.5}
    first = build_curriculum(tmp_path / "a", seed=7, sizes=sizes)
    second = build_curriculum(tmp_path / "b", seed=7, sizes=sizes)
    other = build_curriculum(tmp_path / "c", seed=8, sizes=sizes)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    assert [p.name for p in first.values()] == [p.name for p in second.values()] == [p.name for p in other.values()]

    # Asked again for the same seed and sizes, the directory is reused as it is; other sizes rebuild it.
    (tmp_path / "a" / "marker").touch()
    again = build_curriculum(tmp_path / "a", seed=7, sizes=sizes)
    assert again == first and (tmp_path / "a" / "marker").exists()
    rebuilt = build_curriculum(tmp_path / "a", seed=7, sizes={**sizes, "text": 4})
    assert len(read_manifest(rebuilt["train/text"])) == 4 and not (tmp_path / "a" / "marker").exists()


def test_the_held_out_share_leaves_the_training_split_as_it_was(tmp_path: Path) -> None:
    """The training split is drawn first: a larger held-out split (a steadier measure) trains the same model."""
    sizes = {"image": 3, "video": 2, "spoken": 4, "chatter": 3, "asr": 2, "caption": 2, "text": 3}
    small = build_curriculum(tmp_path / "small", seed=7, sizes={**sizes, "heldout": 0.3})
    large = build_curriculum(tmp_path / "large", seed=7, sizes={**sizes, "heldout": 1.0})
    assert tree_digest(tmp_path / "small" / "train") == tree_digest(tmp_path / "large" / "train")
    assert len(read_manifest(large["heldout/spoken"])) == 4 > len(read_manifest(small["heldout/spoken"]))
    assert CurriculumSizes.tiny().count("video", "heldout") == 120  # make train-tiny's: 120 clips held out (36 at 0.15)


def test_asides_are_training_chatter_alone_and_leave_every_other_sample_as_it_was(tmp_path: Path) -> None:
    """The questions asked of someone else join the training chatter from a random stream of their own: the held-out
    split and every other training sample are byte for byte those of the curriculum without them."""
    sizes = {"image": 3, "video": 2, "spoken": 4, "chatter": 3, "asr": 2, "caption": 2, "text": 3}
    none = build_curriculum(tmp_path / "none", seed=7, sizes={**sizes, "asides": 0})
    some = build_curriculum(tmp_path / "some", seed=7, sizes={**sizes, "asides": 5})
    assert tree_digest(tmp_path / "none" / "heldout") == tree_digest(tmp_path / "some" / "heldout")
    for name in none:
        before, after = none[name].read_text().splitlines(), some[name].read_text().splitlines()
        assert after[:len(before)] == before, name
        assert len(after) == len(before) + (5 if name == "train/chatter" else 0), name
    asides = read_manifest(some["train/chatter"])[3:]
    assert {s.meta["text"] for s in asides} <= set(ASIDE_QUESTIONS)
    assert all(s.state == "<2>" and s.answer == "" and s.meta["voice"] in CHATTER_VOICES["en"] for s in asides)
    assert not set(ASIDE_QUESTIONS) & {s.meta.get("text") for s in read_manifest(some["heldout/chatter"])}


def test_unknown_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown curriculum size"):
        build_curriculum(tmp_path / "x", sizes={"podcasts": 3})


def test_an_image_spec_asks_the_task_it_is_given_and_draws_as_before_without_one() -> None:
    import random

    from vita.training.curriculum import IMAGE_QUESTIONS, image_answers, image_spec

    for task in IMAGE_QUESTIONS:
        spec = image_spec(random.Random(5), task)
        assert spec["task"] == task and spec["answer"] == image_answers(spec)[task]
    drawn = image_spec(random.Random(5))
    assert drawn == image_spec(random.Random(5), None)  # the curriculum's own draws are unchanged
    with pytest.raises(ValueError, match="image task 'size'"):
        image_spec(random.Random(5), "size")
