"""Training data: JSONL manifests of `Sample`s, and loaders that turn public corpora's own layouts into Samples.

A manifest is one JSON object per line (`docs/training.md`, "Manifests"); media paths in it are relative to the
manifest file, so a manifest and its media move together. Reading checks every line and fails on the first bad one
with a one-line `DataError` naming the file and line (bad JSON, a missing field, an unknown kind, a placeholder
count that disagrees with the media, a media file that is not there).

The loaders read the corpora as published, with no conversion step:

- `load_wenetspeech`: `WenetSpeech.json` (`audios[].segments[]` with `begin_time`/`end_time`/`text`/`subsets`);
- `load_gigaspeech`: `GigaSpeech.json` (same shape, `text_tn` with `<COMMA>`-style punctuation tags);
- `load_wavcaps`: WavCaps JSON (`{"data": [{"id", "caption", "audio"/"wav_path", ...}]}` or a bare list);
- `load_llava`: LLaVA-style conversations (`[{"id", "image", "conversations": [{"from", "value"}]}]`).

Segments of long recordings stay in their files: the sample's audio path carries the range as a media fragment
(`a.opus#t=20.08,24.4`), which `load_audio_ref` decodes by seeking, so no corpus has to be cut up first.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vita.errors import InvalidInputError, VitaError, ffmpeg_reason
from vita.training.sample import KINDS, ROLES, STATES, Sample

IMAGE, VIDEO, AUDIO = "<image>", "<video>", "<audio>"
ASR_INSTRUCTION = {"en": "Transcribe the speech.", "zh": "请把这段语音转写成文字。"}
CAPTION_INSTRUCTION = "Describe the sound."
AUDIO_EXTENSIONS = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".m4a")

# GigaSpeech's normalised text keeps four punctuation marks as tags; dev/test label non-speech with garbage tags.
GIGASPEECH_PUNCTUATION = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
GIGASPEECH_GARBAGE = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")


class DataError(VitaError):
    """Bad training or evaluation data; the message starts with `file:line:` so it can be fixed at once."""


# ----------------------------------------------------------------------------------------------------------------
# Manifests


# What a manifest reader says of a file that is one JSON document (LLaVA's, WavCaps') rather than JSON Lines.
_DOCUMENT = (": this looks like one JSON document, not JSONL (one sample per line); a public set's file is converted "
             "by `vita data convert`")


def read_manifest(path: str | Path, *, check_files: bool = True) -> list[Sample]:
    """Every sample of a JSONL manifest, media paths made absolute; `DataError` on the first bad line."""
    return list(iter_manifest(path, check_files=check_files))


def iter_manifest(path: str | Path, *, check_files: bool = True) -> Iterator[Sample]:
    """Streams a manifest line by line (blank lines are skipped), for corpora too big to hold as Samples."""
    path = Path(path)
    base = path.absolute().parent  # media paths come out absolute, whatever the working directory is later
    try:
        handle = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest: {e.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line.rstrip("\r\n"))  # a truncated line's error then points into the line
            except json.JSONDecodeError as e:
                document = number == 1 and (line.lstrip().startswith("[") or line.strip() == "{")
                raise DataError(f"{where}: bad JSON: {e.msg} (column {e.colno}){_DOCUMENT if document else ''}"
                                ) from None
            if number == 1 and isinstance(record, list):
                raise DataError(f"{where}: a JSON list{_DOCUMENT}")
            yield sample_from_record(record, base, where, check_files=check_files)


def write_manifest(path: str | Path, samples: Iterable[Sample]) -> Path:
    """Writes samples as JSONL with media paths relative to the manifest's directory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(sample_to_record(sample, base), ensure_ascii=False) + "\n")
    return path


def sample_to_record(sample: Sample, base: Path) -> dict[str, Any]:
    record = asdict(sample)
    del record["origin"]
    record["images"] = [_relative(p, base) for p in sample.images]
    record["video"] = _relative(sample.video, base) if sample.video else None
    record["audio"] = [_relative(p, base) for p in sample.audio]
    if not record["meta"]:
        del record["meta"]
    return record


def sample_from_record(record: Any, base: Path, where: str, *, check_files: bool = True) -> Sample:
    """Validates one manifest record (`where` prefixes every error) and resolves its paths against `base`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a manifest line must be a JSON object, not {type(record).__name__}")
    for name in ("kind", "conversation"):
        if name not in record:
            raise DataError(f"{where}: missing field {name!r}")
    unknown = set(record) - {"kind", "conversation", "images", "video", "audio", "state", "meta"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    kind = record["kind"]
    if kind not in KINDS:
        raise DataError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    conversation = _conversation(record["conversation"], where)
    images = _string_list(record.get("images") or [], "images", where)
    audio = _string_list(record.get("audio") or [], "audio", where)
    video = record.get("video")
    if video is not None and not isinstance(video, str):
        raise DataError(f"{where}: 'video' must be a path string or null")
    state = record.get("state")
    if state is not None and state not in STATES:
        raise DataError(f"{where}: unknown state {state!r}; expected one of {', '.join(STATES)} or null")
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: 'meta' must be an object")
    text = "".join(turn["content"] for turn in conversation if turn["role"] == "user")
    for placeholder, n, what in ((IMAGE, len(images), "image path(s)"), (VIDEO, int(video is not None), "video"),
                                 (AUDIO, len(audio), "audio path(s)")):
        if text.count(placeholder) != n:
            raise DataError(f"{where}: the user turns have {text.count(placeholder)} {placeholder} placeholder(s) "
                            f"but {n} {what}")
    for ref in audio:
        try:
            split_audio_ref(ref)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    sample = Sample(kind=kind, conversation=conversation, images=[_resolve(p, base) for p in images],
                    video=_resolve(video, base) if video else None, audio=[_resolve(p, base) for p in audio],
                    state=state, meta={str(k): str(v) for k, v in meta.items()}, origin=where)
    if check_files:
        for media in [*sample.images, *([sample.video] if sample.video else []), *sample.audio]:
            file = _split_fragment(media)[0]
            if not os.path.isfile(file):
                raise DataError(f"{where}: media file not found: {file}")
    return sample


def _conversation(turns: Any, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversation' must be a non-empty list of turns")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: conversation[{k}] must be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: conversation[{k}] has role {turn['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise DataError(f"{where}: conversation[{k}] content must be a string")
        if turn["role"] == "system" and k != 0:
            raise DataError(f"{where}: conversation[{k}] is a system turn; only the first turn may be one")
        out.append({"role": turn["role"], "content": turn["content"]})
    dialogue = [t["role"] for t in out if t["role"] != "system"]
    if not dialogue or dialogue[0] != "user" or any(a == b for a, b in itertools.pairwise(dialogue)):
        raise DataError(f"{where}: turns must alternate user, bot, user, ... starting with user")
    return out


def _string_list(value: Any, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {name!r} must be a list of path strings")
    return value


def _resolve(path: str, base: Path) -> str:
    file, fragment = _split_fragment(path)
    return os.path.normpath(os.path.join(base, file)) + fragment


def _relative(path: str, base: Path) -> str:
    file, fragment = _split_fragment(path)
    return os.path.relpath(os.path.abspath(file), base) + fragment


def _split_fragment(path: str) -> tuple[str, str]:
    k = path.rfind("#t=")
    return (path, "") if k < 0 else (path[:k], path[k:])


# ----------------------------------------------------------------------------------------------------------------
# Audio references: a file, or a time range of one


def audio_ref(path: str | Path, begin: float | None = None, end: float | None = None) -> str:
    """`path`, or `path#t=BEGIN,END` (seconds, W3C media-fragment syntax) for a segment of a long recording."""
    if begin is None and end is None:
        return str(path)
    return f"{path}#t={_seconds(begin or 0.0)},{_seconds(end) if end is not None else ''}"


def _seconds(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") or "0"


def split_audio_ref(ref: str) -> tuple[str, float | None, float | None]:
    """(file, begin_s, end_s) of an audio reference; begin/end are None for a whole file."""
    file, fragment = _split_fragment(ref)
    if not fragment:
        return file, None, None
    m = re.fullmatch(r"#t=([0-9.]*),?([0-9.]*)", fragment)
    if not m:
        raise DataError(f"bad audio time range {fragment!r} in {ref!r}; expected #t=BEGIN,END in seconds")
    begin = float(m.group(1)) if m.group(1) else 0.0
    end = float(m.group(2)) if m.group(2) else None
    if end is not None and end <= begin:
        raise DataError(f"empty audio time range {fragment!r} in {ref!r}")
    return file, begin, end


def load_audio_ref(ref: str, *, target_rate: int = 16000) -> np.ndarray:
    """The 16 kHz mono float32 waveform of a file or of its `#t=` range (decoded by seeking, not whole)."""
    from vita.processing.audio import load_audio, resample

    file, begin, end = split_audio_ref(ref)
    if begin is None:
        return load_audio(file, target_rate=target_rate).numpy()
    samples, rate = _decode_range(file, begin, end)
    if samples.size == 0:
        raise DataError(f"{file}: the range {begin}-{end} s holds no audio")
    import torch

    return resample(torch.from_numpy(samples), rate, target_rate).clamp_(-1, 1).numpy()


def check_medium(kind: str, ref: str) -> None:
    """Decodes one medium as the model will read it, to find bad data before a long run: an image, an audio file
    or `#t=` range of one (`kind` "audio"), a video (opened, its first frame decoded). DataError `REF: reason`."""
    from vita.processing.image import load_image
    from vita.processing.video import check_video

    checks = {"image": load_image, "audio": load_audio_ref, "video": check_video}
    if kind not in checks:
        raise ValueError(f"unknown medium {kind!r}; expected one of {', '.join(checks)}")
    try:
        checks[kind](ref)
    except (InvalidInputError, DataError) as e:
        file = _split_fragment(ref)[0]
        raise DataError(f"{ref}: {str(e).removeprefix(f'{file}: ')}") from None


def check_media(media: Iterable[tuple[str, str, str | Callable[[], str]]], *, progress: str = "") -> None:
    """`check_medium` on each (kind, ref, where) once per ref, before a long run reads them: a bad one is a
    `DataError` prefixed by the `where` of its first use (a string, or a function computed only then). `progress`:
    a bar with that name, shown when the check takes more than a second."""
    first: dict[str, tuple[str, str | Callable[[], str]]] = {}
    for kind, ref, where in media:
        first.setdefault(ref, (kind, where))
    todo: Iterable[tuple[str, tuple[str, str | Callable[[], str]]]] = first.items()
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc=progress, unit="file", leave=False, delay=1.0)
    for ref, (kind, where) in todo:
        try:
            check_medium(kind, ref)
        except DataError as e:
            raise DataError(f"{where() if callable(where) else where}: {e}") from None


def _decode_range(file: str, begin: float, end: float | None) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(file) as container:
            if not container.streams.audio:
                raise DataError(f"{file}: no audio stream")
            stream = container.streams.audio[0]
            rate = stream.rate
            if begin > 0 and stream.time_base:
                container.seek(int(begin / stream.time_base), stream=stream, backward=True)
            to_mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks: list[np.ndarray] = []
            start_of_chunks: float | None = None
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else None
                for f in to_mono.resample(frame):
                    if start_of_chunks is None:
                        start_of_chunks = t if t is not None else 0.0
                    chunks.append(f.to_ndarray().reshape(-1))
                if end is not None and t is not None and t > end:
                    break
    except av.FFmpegError as e:
        raise DataError(f"{file}: cannot decode audio: {ffmpeg_reason(e)}") from None
    except OSError as e:
        raise DataError(f"{file}: cannot read audio: {e.strerror}") from None
    if not chunks:
        return np.zeros(0, np.float32), rate
    x = np.concatenate(chunks)
    lo = max(0, round((begin - (start_of_chunks or 0.0)) * rate))
    hi = len(x) if end is None else max(lo, round((end - (start_of_chunks or 0.0)) * rate))
    return x[lo:hi].astype(np.float32), rate


# ----------------------------------------------------------------------------------------------------------------
# Reading JSON documents with line numbers for errors


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading BOM dropped); unreadable or non-UTF-8 is a `DataError` naming the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None


def load_json(path: str | Path) -> Any:
    """A JSON document; syntax errors become a `DataError` naming the file and line."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno})") from None


class _Located(dict):
    line = 0


def json_line(path: str | Path, keys: Sequence[str | int]) -> int | None:
    """The line where the object at `keys` (e.g. `["audios", 3, "segments", 7]`) starts in a JSON file.

    Only called on the error path: it parses again with the pure-Python scanner, which records where each object
    begins, so the happy path keeps the fast C parser.
    """
    text = read_text(path)
    newlines = [m.start() for m in re.finditer("\n", text)]

    def parse_object(s_and_end, *args, **kwargs):
        obj, stop = json.decoder.JSONObject(s_and_end, *args, **kwargs)
        located = _Located(obj)
        located.line = bisect.bisect_left(newlines, s_and_end[1] - 1) + 1
        return located, stop

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        node: Any = decoder.decode(text)
        for key in keys:
            node = node[key]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return node.line if isinstance(node, _Located) else None


class JsonItems:
    """Raises `DataError`s about items of one JSON file, locating the offending item's line when asked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = load_json(self.path)

    def error(self, keys: Sequence[str | int], message: str) -> DataError:
        line = json_line(self.path, keys)
        label = "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(keys))
        return DataError(f"{self.path}:{line if line is not None else '?'}: {label}: {message}")

    def field(self, item: Any, keys: Sequence[str | int], name: str, kind: type | tuple[type, ...] = str) -> Any:
        if not isinstance(item, dict):
            raise self.error(keys, "must be an object")
        if name not in item:
            raise self.error(keys, f"missing field {name!r}")
        value = item[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(keys, f"field {name!r} must be {expected}, not {type(value).__name__}")
        return value

    def items(self, key: str | None = None) -> list[tuple[list[str | int], Any]]:
        """(keys, item) for each element of the top-level list, or of the list under `key`."""
        data = self.data
        prefix: list[str | int] = []
        if key is not None:
            if not isinstance(data, dict) or key not in data:
                raise DataError(f"{self.path}:1: expected a JSON object with a {key!r} list")
            data, prefix = data[key], [key]
        if not isinstance(data, list):
            raise DataError(f"{self.path}:1: expected a list{f' under {key!r}' if key else ''}")
        return [([*prefix, k], item) for k, item in enumerate(data)]


# ----------------------------------------------------------------------------------------------------------------
# ASR corpora: WenetSpeech and GigaSpeech


def load_wenetspeech(path: str | Path, subsets: Sequence[str] | None = None, *,
                     instruction: str = ASR_INSTRUCTION["zh"], min_confidence: float = 0.0,
                     check_files: bool = True) -> list[Sample]:
    """ASR samples from `WenetSpeech.json`; `subsets` (e.g. `["L"]`, `["TEST_NET"]`) keeps segments tagged so."""
    return _load_long_audio_corpus(path, subsets, "text", instruction, "wenetspeech", "zh", min_confidence,
                                   check_files)


def load_gigaspeech(path: str | Path, subsets: Sequence[str] | None = None, *,
                    instruction: str = ASR_INSTRUCTION["en"], check_files: bool = True) -> list[Sample]:
    """ASR samples from `GigaSpeech.json` (`text_tn`); punctuation tags become marks, garbage segments are dropped.

    GigaSpeech writes subsets in braces (`{XL}`, `{DEV}`, `{TEST}`); `subsets` matches with or without them.
    """
    return _load_long_audio_corpus(path, subsets, "text_tn", instruction, "gigaspeech", "en", 0.0, check_files)


def gigaspeech_text(text_tn: str) -> str | None:
    """`AS THEY SAY <COMMA> IT WORKS <PERIOD>` -> `as they say, it works.`; None for a garbage-only segment."""
    words = text_tn.split()
    if not words or all(w in GIGASPEECH_GARBAGE for w in words):
        return None
    out: list[str] = []
    for word in words:
        if word in GIGASPEECH_GARBAGE:
            continue
        if word in GIGASPEECH_PUNCTUATION:
            if out:
                out[-1] += GIGASPEECH_PUNCTUATION[word]
            continue
        out.append(word.lower())
    return " ".join(out) or None


def _load_long_audio_corpus(path: str | Path, subsets: Sequence[str] | None, text_field: str, instruction: str,
                            source: str, language: str, min_confidence: float, check_files: bool) -> list[Sample]:
    doc = JsonItems(path)
    wanted = {s.strip("{}").upper() for s in subsets} if subsets else None
    samples = []
    for keys, audio in doc.items("audios"):
        file = doc.field(audio, keys, "path")
        aid = str(audio.get("aid", "")) if isinstance(audio, dict) else ""
        full = os.path.normpath(os.path.join(doc.path.parent, file))
        segments = doc.field(audio, keys, "segments", list)
        if check_files and segments and not os.path.isfile(full):
            raise doc.error(keys, f"audio file not found: {full}")
        for k, segment in enumerate(segments):
            skeys = [*keys, "segments", k]
            begin = doc.field(segment, skeys, "begin_time", (int, float))
            end = doc.field(segment, skeys, "end_time", (int, float))
            text = doc.field(segment, skeys, text_field)
            tags = segment.get("subsets", [])
            if not isinstance(tags, list):
                raise doc.error(skeys, "field 'subsets' must be a list")
            tags = [str(t).strip("{}").upper() for t in tags]
            if wanted is not None and not wanted.intersection(tags):
                continue
            if not (math.isfinite(begin) and math.isfinite(end)) or end <= begin:
                raise doc.error(skeys, f"begin_time {begin} must be before end_time {end}")
            if float(segment.get("confidence", 1.0)) < min_confidence:
                continue
            if source == "gigaspeech":
                text = gigaspeech_text(text)
                if text is None:
                    continue
            samples.append(Sample(
                kind="asr",
                conversation=[{"role": "user", "content": AUDIO + instruction}, {"role": "bot", "content": text}],
                audio=[audio_ref(full, begin, end)],
                meta={"id": str(segment.get("sid", f"{aid}_{k}")), "source": source, "language": language,
                      "subsets": " ".join(tags)},
            ))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Audio captioning: WavCaps


def load_wavcaps(path: str | Path, audio_dir: str | Path | None = None, *,
                 instruction: str = CAPTION_INSTRUCTION, check_files: bool = True) -> list[Sample]:
    """Captioning samples from a WavCaps JSON file.

    The released files (`json_files/AudioSet_SL/as_final.json`, `FreeSound/fsd_final.json`, ...) are
    `{"num_captions_per_audio": 1, "data": [{"id", "caption", "audio": "wav_path", "duration", ...}]}`; the
    `audio`/`wav_path` field is a placeholder there, so the clip is found as `audio_dir/ID` or `audio_dir/STEM.EXT`
    (`Yb0RFKhbpFJA.wav` -> `Yb0RFKhbpFJA.flac`, as in the released flac archives). A real path in the field
    (relative to the JSON file or `audio_dir`) is used as is. `audio_dir` defaults to the JSON file's directory.
    """
    doc = JsonItems(path)
    root = Path(audio_dir) if audio_dir is not None else doc.path.parent
    listed = doc.items("data") if isinstance(doc.data, dict) else doc.items()
    samples = []
    for keys, item in listed:
        clip_id = doc.field(item, keys, "id", (str, int))
        caption = doc.field(item, keys, "caption")
        named = item.get("audio") or item.get("wav_path")
        file = _find_clip(root, doc.path.parent, str(clip_id), named if isinstance(named, str) else None)
        if file is None:
            if check_files:
                raise doc.error(keys, f"audio for id {clip_id!r} not found under {root}")
            file = str(root / str(clip_id))
        samples.append(Sample(
            kind="caption",
            conversation=[{"role": "user", "content": AUDIO + instruction}, {"role": "bot", "content": caption}],
            audio=[file], meta={"id": str(clip_id), "source": "wavcaps"},
        ))
    return samples


def _find_clip(root: Path, json_dir: Path, clip_id: str, named: str | None) -> str | None:
    candidates = []
    if named and named != "wav_path":
        candidates += [json_dir / named, root / named]
    stem = Path(clip_id).stem if Path(clip_id).suffix.lower() in AUDIO_EXTENSIONS else clip_id
    candidates += [root / clip_id] + [root / f"{stem}{ext}" for ext in AUDIO_EXTENSIONS]
    return next((os.path.normpath(c) for c in candidates if c.is_file()), None)


# ----------------------------------------------------------------------------------------------------------------
# Image conversations: LLaVA


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "bot", "assistant": "bot", "system": "system"}


def load_llava(path: str | Path, image_dir: str | Path | None = None, *, check_files: bool = True) -> list[Sample]:
    """Samples from a LLaVA-style JSON list: `{"id", "image"?, "conversations": [{"from", "value"}]}`.

    `image` (one path or a list, relative to `image_dir`, default the JSON file's directory) makes an image
    sample; without it the entry is a text conversation. An image the text does not place with `<image>` goes at
    the start of the first user turn, as LLaVA's own loader does. Questions are typed, so `state` is `<3>`.
    """
    doc = JsonItems(path)
    root = (Path(image_dir) if image_dir is not None else doc.path.parent).absolute()
    samples = []
    for keys, item in doc.items():
        turns = doc.field(item, keys, "conversations", list)
        raw_images = item.get("image")
        images = [raw_images] if isinstance(raw_images, str) else list(raw_images or [])
        if not all(isinstance(i, str) for i in images):
            raise doc.error(keys, "field 'image' must be a path or a list of paths")
        conversation = []
        for k, turn in enumerate(turns):
            who = doc.field(turn, [*keys, "conversations", k], "from")
            value = doc.field(turn, [*keys, "conversations", k], "value")
            if who not in LLAVA_ROLES:
                raise doc.error([*keys, "conversations", k], f"unknown speaker {who!r}; expected one of "
                                f"{', '.join(LLAVA_ROLES)}")
            conversation.append({"role": LLAVA_ROLES[who], "content": value})
        placed = sum(t["content"].count(IMAGE) for t in conversation if t["role"] == "user")
        if images and placed == 0:
            first = next((t for t in conversation if t["role"] == "user"), None)
            if first is not None:
                first["content"] = IMAGE * len(images) + "\n" + first["content"]
        paths = [os.path.normpath(root / i) for i in images]
        try:
            for p in paths:
                if check_files and not os.path.isfile(p):
                    raise DataError(f": image file not found: {p}")
            sample = sample_from_record({"kind": "image" if images else "text", "conversation": conversation,
                                         "images": paths, "state": "<3>"}, root, "", check_files=False)
        except DataError as e:
            raise doc.error(keys, str(e).removeprefix(": ")) from None
        sample.meta = {"id": str(item.get("id", keys[-1])), "source": "llava"}
        samples.append(sample)
    return samples
