"""Manifests and the loaders for public corpora, on small files written here in each corpus's published layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from media_files import ramp_tone, write_audio, write_image

from vita.training.data import (
    DataError,
    audio_ref,
    gigaspeech_text,
    json_line,
    load_audio_ref,
    load_gigaspeech,
    load_llava,
    load_wavcaps,
    load_wenetspeech,
    read_manifest,
    split_audio_ref,
    write_manifest,
)
from vita.training.sample import Sample

# ---------------------------------------------------------------------------------------------------------------
# Manifests


def _record(**overrides) -> dict:
    record = {"kind": "image", "conversation": [{"role": "user", "content": "<image>\nWhat colour?"},
                                                {"role": "bot", "content": "red"}],
              "images": ["img/a.png"], "video": None, "audio": [], "state": "<3>"}
    record.update(overrides)
    return record


def _write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_manifest_round_trip_keeps_paths_relative_to_the_manifest(tmp_path: Path) -> None:
    image = write_image(tmp_path / "data" / "img" / "a.png")
    clip = write_audio(tmp_path / "data" / "audio" / "q.wav", ramp_tone(1.0))
    samples = [
        Sample("image", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\n<audio>"},
                         {"role": "bot", "content": "red"}], images=[str(image)], audio=[str(clip)], state="<1>",
               meta={"task": "colour"}),
        Sample("asr", [{"role": "user", "content": "<audio>Transcribe."}, {"role": "bot", "content": "hello"}],
               audio=[audio_ref(clip, 0.25, 0.75)]),
    ]
    manifest = write_manifest(tmp_path / "data" / "train.jsonl", samples)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert lines[0]["images"] == ["img/a.png"] and lines[0]["audio"] == ["audio/q.wav"]
    assert lines[1]["audio"] == ["audio/q.wav#t=0.25,0.75"]
    assert "meta" not in lines[1]  # empty meta is left out

    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)  # a manifest and its media move together
    back = read_manifest(moved / "train.jsonl")
    assert back[0].images == [str(moved / "img" / "a.png")]
    assert back[0].conversation == samples[0].conversation and back[0].state == "<1>"
    assert back[0].meta == {"task": "colour"} and back[0].answer == "red"
    assert back[1].audio == [f"{moved / 'audio' / 'q.wav'}#t=0.25,0.75"]


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"bad JSON"),
    (_record(kind="podcast"), r"unknown kind 'podcast'"),
    ({k: v for k, v in _record().items() if k != "conversation"}, r"missing field 'conversation'"),
    (_record(state="<9>"), r"unknown state '<9>'"),
    (_record(images=[]), r"1 <image> placeholder\(s\) but 0 image path\(s\)"),
    (_record(images=["img/missing.png"]), r"media file not found: .*missing\.png"),
    (_record(conversation=[{"role": "bot", "content": "hi"}]), r"must alternate user, bot"),
    (_record(conversation=[{"role": "narrator", "content": "x"}]), r"role 'narrator'"),
    (_record(colour="red"), r"unknown field\(s\) colour"),
    ([1, 2], r"must be a JSON object"),
    ('{"kind": "image", ', r"bad JSON: .*\(column 19\)$"),  # where the line ends, not past its newline
    (_record(conversation=[{"role": "user", "content": "<image><audio>"}, {"role": "bot", "content": "x"}],
             audio=["long.opus#t=4,2"]), r"empty audio time range '#t=4,2'"),
    (_record(conversation=[{"role": "user", "content": "<image><audio>"}, {"role": "bot", "content": "x"}],
             audio=["long.opus#t=x"]), r"bad audio time range '#t=x'"),
])
def test_a_bad_manifest_line_is_one_error_naming_file_and_line(tmp_path: Path, line, message: str) -> None:
    write_image(tmp_path / "img" / "a.png")
    manifest = _write_lines(tmp_path / "m.jsonl", [_record(), "", line])
    with pytest.raises(DataError) as error:
        read_manifest(manifest)
    text = str(error.value)
    assert text.startswith(f"{manifest}:3: ") and "\n" not in text
    assert re.search(message, text), text


@pytest.mark.parametrize("document", [
    json.dumps([{"id": "1", "image": "a.png", "conversations": []}], indent=2),  # LLaVA's layout
    json.dumps([{"id": "1"}]),  # on one line
    json.dumps({"samples": []}, indent=2),
])
def test_a_json_document_given_as_a_manifest_is_named_so(tmp_path: Path, document: str) -> None:
    """A user's try (2026-12-04): LLaVA's JSON given to `vita data check` read "bad JSON" although it is valid."""
    path = tmp_path / "llava.json"
    path.write_text(document)
    with pytest.raises(DataError, match=r"llava\.json:1: .*one JSON document, not JSONL .* `vita data convert`"):
        read_manifest(path)


def test_media_paths_are_absolute_whatever_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    write_image(tmp_path / "img" / "a.png")
    _write_lines(tmp_path / "m.jsonl", [_record()])
    monkeypatch.chdir(tmp_path)
    samples = read_manifest("m.jsonl")
    monkeypatch.chdir("/")  # a later chdir (a data loader worker, a launcher) must not break the paths
    assert samples[0].images == [str(tmp_path / "img" / "a.png")] and Path(samples[0].images[0]).is_file()


def test_check_files_false_reads_a_manifest_whose_media_are_elsewhere(tmp_path: Path) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", [_record()])
    assert read_manifest(manifest, check_files=False)[0].images == [str(tmp_path / "img" / "a.png")]


def test_a_missing_or_binary_manifest_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read the manifest"):
        read_manifest(tmp_path / "nope.jsonl")
    binary = tmp_path / "m.jsonl"
    binary.write_bytes(json.dumps(_record()).encode() + b"\n\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(binary))}:2: not UTF-8 text$"):
        read_manifest(binary, check_files=False)


# ---------------------------------------------------------------------------------------------------------------
# Audio references


def test_audio_refs_round_trip() -> None:
    assert audio_ref("a.opus") == "a.opus"
    assert audio_ref("a.opus", 20.08, 24.4) == "a.opus#t=20.08,24.4"
    assert split_audio_ref("dir/a.opus#t=20.08,24.4") == ("dir/a.opus", 20.08, 24.4)
    assert split_audio_ref("a.wav") == ("a.wav", None, None)
    with pytest.raises(DataError, match="empty audio time range"):
        split_audio_ref("a.wav#t=3,2")


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".opus"])
def test_load_audio_ref_cuts_the_range_out_of_a_long_recording(tmp_path: Path, suffix: str) -> None:
    path = write_audio(tmp_path / f"long{suffix}", ramp_tone(10.0))
    whole = load_audio_ref(str(path))
    assert abs(len(whole) / 16000 - 10.0) < 0.03
    for begin, end in ((0.0, 1.0), (4.25, 5.5), (8.0, 9.9)):
        cut = load_audio_ref(audio_ref(path, begin, end))
        assert cut.dtype == np.float32
        assert abs(len(cut) / 16000 - (end - begin)) < 0.01, (begin, end, len(cut))
        # The ramp's loudness at the end of the cut says the cut is where it was asked for (the codec adds ~1%).
        assert abs(np.abs(cut).max() - 0.5 * end / 10) < 0.01, (begin, end)


# ---------------------------------------------------------------------------------------------------------------
# WenetSpeech and GigaSpeech


def _wenetspeech(root: Path) -> Path:
    write_audio(root / "audio" / "train" / "youtube" / "B00000" / "Y0000000000_--5llN02F84.opus", ramp_tone(6.0))
    write_audio(root / "audio" / "test" / "podcast" / "X0000000001.opus", ramp_tone(4.0))
    doc = {"dataset": "WenetSpeech", "language": "Chinese", "version": "v1.0.0", "audios": [
        {"aid": "Y0000000000_--5llN02F84", "duration": 6.0, "format": "opus", "sample_rate": 16000,
         "path": "audio/train/youtube/B00000/Y0000000000_--5llN02F84.opus", "source": "youtube",
         "segments": [
             {"sid": "Y0000000000_--5llN02F84_S00000", "confidence": 1.0, "begin_time": 0.5, "end_time": 2.25,
              "text": "怎么样这些日子住得还习惯吧", "subsets": ["L", "M", "S", "W"]},
             {"sid": "Y0000000000_--5llN02F84_S00001", "confidence": 0.6, "begin_time": 3.0, "end_time": 5.0,
              "text": "还行", "subsets": ["L", "W"]}]},
        {"aid": "X0000000001", "duration": 4.0, "format": "opus", "sample_rate": 16000,
         "path": "audio/test/podcast/X0000000001.opus", "source": "podcast",
         "segments": [
             {"sid": "X0000000001_S00000", "confidence": 1.0, "begin_time": 1.0, "end_time": 3.5,
              "text": "今天天气很好", "subsets": ["TEST_NET"]}]},
    ]}
    path = root / "WenetSpeech.json"
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2))
    return path


def test_wenetspeech_segments_become_asr_samples_with_time_ranges(tmp_path: Path) -> None:
    path = _wenetspeech(tmp_path)
    train = load_wenetspeech(path, ["L"])
    assert [s.meta["id"] for s in train] == ["Y0000000000_--5llN02F84_S00000", "Y0000000000_--5llN02F84_S00001"]
    first = train[0]
    assert first.kind == "asr" and first.state is None and first.answer == "怎么样这些日子住得还习惯吧"
    assert first.conversation[0]["content"].startswith("<audio>")
    audio = tmp_path / "audio" / "train" / "youtube" / "B00000" / "Y0000000000_--5llN02F84.opus"
    assert first.audio == [f"{audio}#t=0.5,2.25"]
    assert abs(len(load_audio_ref(first.audio[0])) / 16000 - 1.75) < 0.01
    assert [s.meta["id"] for s in load_wenetspeech(path, ["L"], min_confidence=0.95)] == [first.meta["id"]]
    test = load_wenetspeech(path, ["TEST_NET"])
    assert [s.answer for s in test] == ["今天天气很好"] and test[0].meta["subsets"] == "TEST_NET"
    assert len(load_wenetspeech(path)) == 3

    # Written as a manifest and read back, the ranges survive.
    back = read_manifest(write_manifest(tmp_path / "asr.jsonl", train))
    assert back[0].audio == first.audio


def test_wenetspeech_errors_name_the_file_and_the_segment_line(tmp_path: Path) -> None:
    path = _wenetspeech(tmp_path)
    doc = json.loads(path.read_text())
    del doc["audios"][1]["segments"][0]["end_time"]
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2))
    line = next(k for k, text in enumerate(path.read_text().splitlines(), 1) if '"X0000000001_S00000"' in text) - 1
    with pytest.raises(DataError) as error:
        load_wenetspeech(path)
    assert str(error.value) == f"{path}:{line}: audios[1].segments[0]: missing field 'end_time'"

    doc["audios"][1]["segments"][0]["end_time"] = 3.5
    doc["audios"][0]["path"] = "audio/nowhere.opus"
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2))
    with pytest.raises(DataError, match=r"WenetSpeech\.json:\d+: audios\[0\]: audio file not found: .*nowhere"):
        load_wenetspeech(path)

    path.write_text('{"audios": [\n  {"aid": 1,,}\n]}')
    with pytest.raises(DataError, match=r"WenetSpeech\.json:2: bad JSON"):
        load_wenetspeech(path)


def test_gigaspeech_text_turns_tags_into_punctuation() -> None:
    assert gigaspeech_text("AS THEY SAY <COMMA> IT WORKS <PERIOD>") == "as they say, it works."
    assert gigaspeech_text("REALLY <QUESTIONMARK> YES <EXCLAMATIONPOINT>") == "really? yes!"
    assert gigaspeech_text("<NOISE> HELLO THERE") == "hello there"
    assert gigaspeech_text("<SIL>") is None and gigaspeech_text("<MUSIC> <NOISE>") is None


def test_gigaspeech_json_with_braced_subsets_and_garbage_segments(tmp_path: Path) -> None:
    write_audio(tmp_path / "audio" / "podcast" / "P0000" / "POD0000000001.opus", ramp_tone(5.0))
    doc = {"dataset": "GigaSpeech", "language": "EN", "version": "v1.0.0", "audios": [
        {"title": "A Podcast", "url": "https://example.org/p", "path": "audio/podcast/P0000/POD0000000001.opus",
         "aid": "POD0000000001", "source": "podcast", "format": "opus", "sample_rate": 16000, "duration": 5.0,
         "segments": [
             {"sid": "POD0000000001_S0000000", "speaker": "N/A", "begin_time": 0.2, "end_time": 1.9,
              "text_tn": "DOUBLE YOUR PROFITS <COMMA> THEY SAID <PERIOD>", "subsets": ["{XL}", "{L}"]},
             {"sid": "POD0000000001_S0000001", "speaker": "N/A", "begin_time": 2.0, "end_time": 2.5,
              "text_tn": "<MUSIC>", "subsets": ["{DEV}"]},
             {"sid": "POD0000000001_S0000002", "speaker": "N/A", "begin_time": 2.5, "end_time": 4.5,
              "text_tn": "WHAT IS IT <QUESTIONMARK>", "subsets": ["{DEV}"]}]}]}
    path = tmp_path / "GigaSpeech.json"
    path.write_text(json.dumps(doc, indent=2))
    xl = load_gigaspeech(path, ["XL"])
    assert [s.answer for s in xl] == ["double your profits, they said."]
    assert xl[0].meta["language"] == "en" and xl[0].audio[0].endswith("POD0000000001.opus#t=0.2,1.9")
    assert [s.answer for s in load_gigaspeech(path, ["{DEV}"])] == ["what is it?"]  # <MUSIC> dropped


# ---------------------------------------------------------------------------------------------------------------
# WavCaps


def test_wavcaps_release_json_with_placeholder_paths(tmp_path: Path) -> None:
    write_audio(tmp_path / "AudioSet_SL_flac" / "Yb0RFKhbpFJA.flac", ramp_tone(1.0))
    write_audio(tmp_path / "AudioSet_SL_flac" / "Y--0w1YA1Hm4.flac", ramp_tone(1.0))
    doc = {"num_captions_per_audio": 1, "data": [
        {"id": "Yb0RFKhbpFJA.wav", "caption": "Wind and a man speaking are heard.", "audio": "wav_path",
         "duration": 10.0},
        {"id": "Y--0w1YA1Hm4.wav", "caption": "A vehicle engine runs.", "audio": "wav_path", "duration": 10.0},
    ]}
    path = tmp_path / "json_files" / "AudioSet_SL" / "as_final.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc, indent=1))
    samples = load_wavcaps(path, tmp_path / "AudioSet_SL_flac")
    assert [s.answer for s in samples] == ["Wind and a man speaking are heard.", "A vehicle engine runs."]
    assert samples[0].kind == "caption" and samples[0].audio == [str(tmp_path / "AudioSet_SL_flac" / "Yb0RFKhbpFJA.flac")]
    assert samples[0].conversation[0]["content"] == "<audio>Describe the sound."

    doc["data"].append({"id": "Ymissing.wav", "caption": "Rain.", "audio": "wav_path", "duration": 10.0})
    path.write_text(json.dumps(doc, indent=1))
    line = next(k for k, text in enumerate(path.read_text().splitlines(), 1) if "Ymissing" in text) - 1
    with pytest.raises(DataError) as error:
        load_wavcaps(path, tmp_path / "AudioSet_SL_flac")
    assert str(error.value).startswith(f"{path}:{line}: data[2]: audio for id 'Ymissing.wav' not found")


def test_wavcaps_bare_list_with_numeric_ids_and_real_paths(tmp_path: Path) -> None:
    write_audio(tmp_path / "2219.flac", ramp_tone(1.0))
    write_audio(tmp_path / "clips" / "bell.wav", ramp_tone(1.0))
    path = tmp_path / "sb_final.json"
    path.write_text(json.dumps([
        {"title": "Airplane Landing Airport", "caption": "An airplane is landing.", "id": "2219", "duration": 14.1},
        {"title": "Service Bell", "caption": "Someone is ringing a bell.", "id": 2218, "wav_path": "clips/bell.wav"},
    ]))
    samples = load_wavcaps(path)
    assert [s.audio[0] for s in samples] == [str(tmp_path / "2219.flac"), str(tmp_path / "clips" / "bell.wav")]
    assert samples[1].meta["id"] == "2218"


# ---------------------------------------------------------------------------------------------------------------
# LLaVA


def test_llava_conversations_become_image_and_text_samples(tmp_path: Path) -> None:
    write_image(tmp_path / "coco" / "train2017" / "000000033471.jpg")
    path = tmp_path / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps([
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
        {"id": "noplace", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A red circle."}]},
    ], indent=1))
    samples = load_llava(path)
    bus, text, noplace = samples
    assert bus.kind == "image" and bus.state == "<3>" and bus.meta == {"id": "000000033471", "source": "llava"}
    assert bus.images == [str(tmp_path / "coco" / "train2017" / "000000033471.jpg")]
    assert [t["role"] for t in bus.conversation] == ["user", "bot", "user", "bot"]
    assert bus.answer == "The back of the bus features an advertisement."
    assert text.kind == "text" and text.images == [] and text.answer == "Hi!"
    assert noplace.conversation[0]["content"] == "<image>\nDescribe it."
    # Every sample is a valid manifest line.
    assert len(read_manifest(write_manifest(tmp_path / "llava.jsonl", samples))) == 3


def test_llava_with_a_relative_image_dir(tmp_path: Path, monkeypatch) -> None:
    """The image directory is applied once: `images/000.png`, never `images/images/000.png`."""
    write_image(tmp_path / "images" / "000.png")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "0", "image": "000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]}]))
    monkeypatch.chdir(tmp_path)
    sample, = load_llava("llava.json", "images")
    assert sample.images == [str(tmp_path / "images" / "000.png")]
    assert read_manifest(write_manifest("m.jsonl", [sample]))[0].images == sample.images


def test_llava_errors_name_the_entry_line(tmp_path: Path) -> None:
    path = tmp_path / "llava.json"
    entries = [{"id": "ok", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
               {"id": "bad", "image": "missing.jpg",
                "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]}]
    path.write_text(json.dumps(entries, indent=1))
    line = next(k for k, text in enumerate(path.read_text().splitlines(), 1) if '"bad"' in text) - 1
    with pytest.raises(DataError) as error:
        load_llava(path)
    assert str(error.value).startswith(f"{path}:{line}: [1]: image file not found: ")

    entries[1] = {"id": "bad", "conversations": [{"from": "narrator", "value": "x"}]}
    path.write_text(json.dumps(entries, indent=1))
    with pytest.raises(DataError, match=r"\[1\]\.conversations\[0\]: unknown speaker 'narrator'"):
        load_llava(path)


def test_json_line_finds_nested_objects(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_text('{\n "a": [\n  {"x": 1},\n  {\n   "y": {"z": 2}\n  }\n ]\n}\n')
    assert json_line(path, []) == 1
    assert json_line(path, ["a", 0]) == 3
    assert json_line(path, ["a", 1]) == 4
    assert json_line(path, ["a", 1, "y"]) == 5
    assert json_line(path, ["a", 7]) is None


@pytest.mark.parametrize("kind, field", [("image", "images"), ("video", "video")])
def test_a_damaged_media_file_is_named_when_a_sample_is_encoded(tmp_path: Path, kind: str, field: str) -> None:
    """A user's try (2026-12-04): training stopped at `m.jsonl:1: image sample: image data is not in a supported
    image format`, without saying which of the line's files it was."""
    from tests import training_helpers as th
    from vita.errors import InvalidInputError
    from vita.training.examples import ExampleEncoder

    bad = tmp_path / f"bad.{'png' if kind == 'image' else 'mp4'}"
    bad.write_bytes(b"garbage")
    tok = th.tokenizer()
    sample = Sample(kind, [{"role": "user", "content": f"<{kind}>\nWhat is it?"}, {"role": "bot", "content": "x"}],
                    **{field: [str(bad)] if field == "images" else str(bad)})
    with pytest.raises(InvalidInputError, match=rf"^{kind} sample: {re.escape(str(bad))}: "):
        ExampleEncoder(tok, th.micro_config(tok.vocab_size))(sample, 0)
