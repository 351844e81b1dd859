"""Streaming voice-activity segmentation with Silero VAD: cut a live 16 kHz stream into speech segments.

The orchestrator of the duplex assistant pushes user audio in chunks of any size and gets back events: "started"
once an utterance is long enough to be real speech, "partial" snapshots while it goes on (to judge it before it
ends), and "ended" with the whole segment, padded, ready for the audio encoder. On request (`report_pauses`) also
"paused" when the speech goes silent (the segment as it will be if that silence ends it: preemptive generation
starts on it) and "resumed" when speech comes back before the segment ended.

How the model is shared. `silero_vad.load_silero_vad()` returns a TorchScript wrapper that keeps the LSTM state,
the 64-sample context and the last sample rate as hidden attributes and mutates them on every call, so two streams
must never call one wrapper. Inside it, `wrapper._model` (the 16 kHz network) is a pure function
`(context + window (1, 576), state) -> (probability (1, 1), new state)`. We load the wrapper once per process and
call only that inner network, each `StreamingVAD` holding its own state and context: instances cost nothing to
create and share no hidden state, and the results are bit-identical to the wrapper's.

Measured on the 2-core dev machine (torch 2.13 CPU, silero-vad 6.2.3):
  - first load, once per process: ~100 ms idle (~400 ms with both cores busy): ~40 ms to load the JIT file and
    ~45 ms of TorchScript profiling runs, paid in the loader as a warm-up (the first two calls of the network take
    ~36 ms and ~8 ms, every later one ~0.25 ms);
  - `StreamingVAD()` after that: ~12 us (two small tensors, no model copy);
  - processing, whatever the chunk size (20 ms to 1 s pushes are within 15 %), spent synchronously in `push`:
    idle machine, 2 torch threads: ~0.25 ms per 32 ms window, ~8 ms of CPU per second of audio (~1 % real time);
    both cores busy (load average 3): ~45 ms per second of audio with 2 torch threads but ~12 ms with 1, since
    the intra-op threads of such small ops only contend. This module leaves the thread count to the process.
  For comparison a `copy.deepcopy` of the wrapper per stream costs ~135 ms and a fresh load ~40 ms. The ONNX
  variant needs onnxruntime, which is not installed, and is not needed.

Caveat: importing `silero_vad` calls `torch.set_num_threads(1)` for the whole process (in `silero_vad/model.py`);
`_load_model` restores the previous value, so this module leaves torch's thread count alone.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from vita.errors import InvalidInputError
from vita.processing.turn import end_of_turn

SAMPLE_RATE = 16000
WINDOW = 512  # Silero's 16 kHz model takes exactly 512 new samples (32 ms) per call
_UNSCALED_PEAK = 2.0  # float samples beyond this are int16 values that nobody divided by 32768


# ----------------------------------------------------------------------------------------------------------------
# Configuration and events


@dataclass(frozen=True)
class VADConfig:
    """Segmentation thresholds and timings.

    The reference VITA demo opened a segment at probability >= 0.7, closed it after 500 ms below 0.55 and dropped
    segments under 1 s. Ours react faster, because every millisecond of end-of-speech latency adds directly to the
    time until the assistant answers, and a 1 s floor silently loses short answers ("yes", "stop"). The thresholds
    and the floor are Silero's own defaults (`get_speech_timestamps`): open at 0.5 with hysteresis down to 0.35
    (0.5 - 0.15), so a segment does not flicker on weak frames, and 250 ms minimum speech, longer than coughs and
    clicks. Silero ends offline segments after only 100 ms of silence, which in a live turn would cut the user off
    at every pause between words; 400 ms still bridges those pauses and short breaths, and costs 100 ms less than
    the demo. The 100 ms padding (Silero: 30 ms) keeps soft onsets and word-final consonants for the encoder.
    """

    start_threshold: float = 0.5  # probability that opens a segment
    end_threshold: float = 0.35  # below this counts as silence (hysteresis)
    min_speech_ms: int = 250  # shorter segments are dropped (coughs, clicks)
    end_silence_ms: int = 400  # this much silence closes a segment
    speech_pad_ms: int = 100  # audio kept before the start and after the end
    max_segment_s: float = 30.0  # a segment this long is closed (the audio encoder has a length cap)
    partial_every_ms: int = 600  # while in speech, report a partial every this many ms of segment (0 = never)
    # Turn-taking (vita.processing.turn). After end_silence_ms the segment ends only if the speech sounds finished
    # (a final pitch fall); if it sounds cut off mid-sentence, it stays open (a hesitation, not the end of the turn)
    # until this much silence. Not above end_silence_ms: no end-of-turn judgement, silence alone ends segments.
    incomplete_silence_ms: int = 800
    # With the judgement on, speech that sounds finished (a measured final fall) ends after this much silence
    # instead of end_silence_ms; speech too short or too unvoiced to judge keeps end_silence_ms. 0, or not below
    # end_silence_ms: off. 160 ms is five Silero windows: the short pauses between words (one window on espeak-ng
    # speech) are bridged, and a pause whose pitch fell and lasts this long ends the turn.
    complete_silence_ms: int = 160
    end_of_turn_ratio: float = 0.835  # final F0 / median F0 at or below this sounds finished (turn.py)
    # While the assistant answers (`StreamingVAD.answering`), speech this long already opens a segment, so a brisk
    # "no" or "stop" (under min_speech_ms) is heard; segments up to barge_in_max_ms (with padding) are never held.
    barge_in_min_speech_ms: int = 64  # two Silero windows: "stop" is one vowel between a fricative and a plosive
    barge_in_max_ms: int = 1000

    def __post_init__(self) -> None:
        for name in ("start_threshold", "end_threshold"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value < 1.0:
                raise InvalidInputError(f"VADConfig.{name} must be a probability in (0, 1); got {value!r}")
        if self.end_threshold > self.start_threshold:
            raise InvalidInputError(
                f"VADConfig.end_threshold ({self.end_threshold}) must not exceed start_threshold "
                f"({self.start_threshold}): the hysteresis band is [end, start)"
            )
        if not _is_real(self.end_of_turn_ratio) or not self.end_of_turn_ratio > 0.0:
            raise InvalidInputError(f"VADConfig.end_of_turn_ratio must be a positive number; got "
                                    f"{self.end_of_turn_ratio!r}")
        for name in ("min_speech_ms", "end_silence_ms", "speech_pad_ms", "partial_every_ms",
                     "incomplete_silence_ms", "complete_silence_ms", "barge_in_min_speech_ms", "barge_in_max_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise InvalidInputError(f"VADConfig.{name} must be a non-negative integer; got {value!r}")
        if not _is_real(self.max_segment_s) or not math.isfinite(self.max_segment_s):
            raise InvalidInputError(f"VADConfig.max_segment_s must be a finite number; got {self.max_segment_s!r}")
        # A segment must be able to hold its start padding, min_speech_ms of speech (measured in whole windows)
        # and one more window, or every segment would be cut before it could start.
        least_ms = self.min_speech_ms + self.speech_pad_ms + 2 * WINDOW * 1000 // SAMPLE_RATE
        if self.max_segment_s * 1000 < least_ms:
            raise InvalidInputError(
                f"VADConfig.max_segment_s={self.max_segment_s:g} is too short: it must be at least "
                f"{least_ms / 1000:g} s (min_speech_ms + speech_pad_ms + two 32 ms VAD windows)"
            )


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclass(frozen=True)
class SpeechEvent:
    """One step in the life of a speech segment; times are seconds since the first sample pushed."""

    kind: Literal["started", "partial", "paused", "resumed", "ended"]
    start_s: float  # segment start, speech_pad_ms before the detected speech where that audio exists
    end_s: float  # end of the audio included so far ("ended": speech end plus padding)
    audio: np.ndarray | None  # float32 16 kHz samples [start_s, end_s); None for "started" and "resumed"
    segment: int  # 0, 1, 2... among the segments reported by this stream


# ----------------------------------------------------------------------------------------------------------------
# The shared model

_model_lock = threading.Lock()
_model: Any = None  # the stateless 16 kHz network inside Silero's JIT wrapper, loaded once per process


def _load_model() -> Any:
    """Silero's 16 kHz network, loaded and warmed up once per process (thread-safe)."""
    global _model
    with _model_lock:
        if _model is None:
            threads = torch.get_num_threads()
            try:
                import silero_vad  # its model.py calls torch.set_num_threads(1) on import

                wrapper = silero_vad.load_silero_vad()
            finally:
                torch.set_num_threads(threads)
            net = getattr(wrapper, "_model", None)
            if net is None or getattr(net, "context_size_samples", None) != 64:
                raise RuntimeError(
                    "silero-vad's JIT model no longer exposes the stateless 16 kHz network `_model` with a "
                    "64-sample context; vita.processing.vad was written against silero-vad 6.2.3"
                )
            with torch.inference_mode():  # TorchScript profiles the first two calls (~45 ms): pay that here
                state = torch.zeros(0)
                for _ in range(3):
                    _, state = net(torch.zeros(1, 64 + WINDOW), state)
            _model = net
        return _model


# ----------------------------------------------------------------------------------------------------------------
# Streaming segmenter


class _History:
    """Recent samples addressed by absolute index since the stream began: append, drop the front, slice."""

    def __init__(self) -> None:
        self._data = np.zeros(4 * SAMPLE_RATE, np.float32)
        self._start = 0  # absolute index of self._data[0]
        self._size = 0

    @property
    def end(self) -> int:
        return self._start + self._size

    def append(self, samples: np.ndarray) -> None:
        need = self._size + len(samples)
        if need > len(self._data):
            grown = np.zeros(max(need, 2 * len(self._data)), np.float32)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        np.clip(samples, -1.0, 1.0, out=self._data[self._size : need])  # tolerate slight decoder overshoot
        self._size = need

    def drop_before(self, index: int) -> None:
        """Forget samples before `index`; moves memory only once the dead prefix is a second long."""
        dead = min(index, self.end) - self._start
        if dead >= SAMPLE_RATE:
            self._data[: self._size - dead] = self._data[dead : self._size]
            self._start += dead
            self._size -= dead

    def view(self, begin: int, end: int) -> np.ndarray:
        if begin < self._start or end > self.end:
            raise AssertionError(f"samples [{begin}, {end}) are not kept ([{self._start}, {self.end}) are)")
        return self._data[begin - self._start : end - self._start]


class StreamingVAD:
    """Cuts one audio stream into speech segments; one instance per stream, not safe to share across threads.

    Decisions are made per 512-sample window, with the remainder of a push carried to the next one, so the events
    do not depend on how the audio was chunked. "started" is emitted only once the speech has lasted
    `min_speech_ms` (so a click never produces an event), with the segment's true start; every "started" is
    followed by exactly one "ended" (by silence, by `max_segment_s`, or by `flush`), unless `reset` drops it.
    With `report_pauses`, a started segment's first silent window after speech gives "paused" (the audio up to
    there, padding included as far as it exists), and the next voiced window of the same segment "resumed"; every
    "paused" is followed by "resumed" or by the segment's "ended", whose speech is then the paused audio's.
    """

    SAMPLE_RATE = SAMPLE_RATE

    def __init__(self, config: VADConfig | None = None) -> None:
        self._net = _load_model()
        # Set by the caller while the assistant answers: shorter speech counts (barge-in words), and short segments
        # end without the end-of-turn hold. A plain attribute: read once per window.
        self.answering = False
        self.report_pauses = False  # "paused" / "resumed" events (preemptive generation); off: the events as before
        self.set_config(config or VADConfig())
        self.reset()

    def set_config(self, config: VADConfig) -> None:
        """New thresholds and timings from the next window on; the stream (positions, an open segment) goes on."""
        self.config = cfg = config
        ms = SAMPLE_RATE // 1000
        self._min_speech = cfg.min_speech_ms * ms
        self._barge_in_speech = min(cfg.barge_in_min_speech_ms, cfg.min_speech_ms) * ms
        self._barge_in_max = cfg.barge_in_max_ms * ms
        self._end_silence = cfg.end_silence_ms * ms
        self._hold_silence = max(cfg.incomplete_silence_ms, cfg.end_silence_ms) * ms
        judging = self._hold_silence > self._end_silence
        self._complete_silence = (cfg.complete_silence_ms * ms if judging and 0 < cfg.complete_silence_ms
                                  < cfg.end_silence_ms else self._end_silence)
        # The judgement (a pitch track of up to 4 s: ~10 ms of CPU, ~50 ms on a busy 2-core machine) is made two
        # windows before the shortest end, so its cost delays no end of turn: the windows after it are pushed
        # while it runs, and taken in a burst after.
        self._judge_silence = max(WINDOW, self._complete_silence - 2 * WINDOW) if judging else self._end_silence
        self._pad = cfg.speech_pad_ms * ms
        self._every = cfg.partial_every_ms * ms
        self._max_len = int(cfg.max_segment_s * SAMPLE_RATE)

    def reset(self) -> None:
        """Forget everything (an open segment is dropped without an event): the next push starts a new stream."""
        self._history = _History()
        self._state = torch.zeros(0)  # Silero's LSTM (h, c); empty means zeros
        self._context = torch.zeros(1, 64)  # the last 64 samples of the previous window
        self._done = 0  # samples already run through the model (a multiple of WINDOW)
        self._floor = 0  # where the previous segment's audio ended: segments never overlap
        self._segment = 0
        self._open = False  # a window crossed start_threshold and no end has been decided yet
        self._started = False  # ... and it has lasted min_speech_ms, so "started" went out
        self._speech_start = 0  # first sample of the window that opened the segment
        self._audio_start = 0  # _speech_start minus the padding, not before _floor
        self._voiced_end = 0  # end of the last window at or above end_threshold
        self._silence_start: int | None = None  # start of the current run of silent windows
        self._judged = False  # the end-of-turn judgement of the speech before this silence run was made ...
        self._finished: bool | None = None  # ... and said: finished, unfinished, or None (no hold, no shortening)
        self._paused = False  # "paused" went out for this silence run
        self._next_partial = 0

    @property
    def in_speech(self) -> bool:
        """Whether a segment has been reported "started" and not yet "ended"."""
        return self._started

    @property
    def segment_open(self) -> bool:
        """Whether speech crossed start_threshold and no end was decided yet (reported "started" or not)."""
        return self._open

    @property
    def end_silence_s(self) -> float:
        """The silence that ends the open segment now: longer while the speech before it sounds unfinished, shorter
        once it was judged finished."""
        judged = self._silence_start is not None and self._judged
        return (self._silence_for(self._finished) if judged else self._end_silence) / SAMPLE_RATE

    @property
    def position_s(self) -> float:
        """Seconds of audio pushed since the stream began (or since the last reset/flush)."""
        return self._history.end / SAMPLE_RATE

    def push(self, samples: np.ndarray | torch.Tensor) -> list[SpeechEvent]:
        """Feed the next chunk (any length, 1-D float32 in [-1, 1] at 16 kHz); returns the events it completes.

        Integer PCM is refused rather than scaled: the stream has one conversion point (`pcm16_to_float` for
        client bytes), and a chunk that skipped it would otherwise pass unnoticed. Bad input raises
        InvalidInputError and leaves the stream as it was.
        """
        chunk = _check_chunk(samples)
        self._history.append(chunk)
        events: list[SpeechEvent] = []
        with torch.inference_mode():
            while self._history.end - self._done >= WINDOW:
                window = torch.from_numpy(self._history.view(self._done, self._done + WINDOW))
                x = torch.cat([self._context, window[None]], dim=1)
                prob, self._state = self._net(x, self._state)
                self._context = x[:, -64:]
                self._done += WINDOW
                self._step(float(prob), events)
        keep = self._audio_start if self._open else max(self._floor, self._done - self._pad)
        self._history.drop_before(keep)
        return events

    def flush(self) -> list[SpeechEvent]:
        """End of input: an open segment that reached min_speech_ms is ended, a shorter one dropped; then reset.

        The samples after the last whole window are not judged by the model but count as audio: a segment still
        in speech ends at the last sample pushed.
        """
        events: list[SpeechEvent] = []
        if self._open:
            end = self._history.end
            if self._silence_start is not None:
                end = min(self._silence_start + self._pad, end)
            self._close(end, events)
        self.reset()
        return events

    def cut(self) -> list[SpeechEvent]:
        """The speaker says the utterance is over (push-to-talk release): an open segment ends at the audio judged
        so far, like `flush`, but the stream goes on (positions keep counting; later speech opens a new segment)."""
        events: list[SpeechEvent] = []
        if self._open:
            end = self._done
            if self._silence_start is not None:
                end = min(self._silence_start + self._pad, end)
            self._close(end, events)
        return events

    # ------------------------------------------------------------------------------------------------------------

    def _step(self, prob: float, events: list[SpeechEvent]) -> None:
        """Advance the segment state by the window that just ended at `self._done`."""
        cfg, end = self.config, self._done
        start = end - WINDOW
        if not self._open:
            if prob < cfg.start_threshold:
                return
            self._open, self._started = True, False
            self._speech_start, self._audio_start = start, max(start - self._pad, self._floor)
            self._voiced_end, self._silence_start = end, None
            self._next_partial = self._every
        elif prob >= cfg.end_threshold:  # hysteresis: once open, only a drop below end_threshold is silence
            self._voiced_end, self._silence_start, self._judged, self._finished = end, None, False, None
            if self._paused:
                self._paused = False
                events.append(SpeechEvent("resumed", self._audio_start / SAMPLE_RATE, end / SAMPLE_RATE, None,
                                          self._segment))
        else:
            if self._silence_start is None:
                self._silence_start = start
                if self.report_pauses and self._started:
                    self._paused = True
                    events.append(self._event("paused", min(start + self._pad, end)))
            silent = end - self._silence_start
            if silent >= self._judge_silence and silent >= self._silence_for(self._end_of_turn()):
                self._close(min(self._silence_start + self._pad, end), events)
                return

        min_speech = self._barge_in_speech if self.answering else self._min_speech
        if not self._started and self._voiced_end - self._speech_start >= min_speech:
            self._started = True
            events.append(SpeechEvent("started", self._audio_start / SAMPLE_RATE, end / SAMPLE_RATE, None,
                                      self._segment))

        if end + WINDOW - self._audio_start > self._max_len:  # the next window would make it too long
            if self._silence_start is not None:  # the speech is over anyway: end it as silence would
                self._close(min(self._silence_start + self._pad, end), events)
            else:  # still talking: end here and carry on in a new segment from this very sample
                self._close(end, events)
                self._open = True
                self._speech_start = self._audio_start = self._voiced_end = end
                self._next_partial = self._every
            return

        # Partials only while voiced: each event's audio is then a prefix of the next one's, and a partial never
        # carries trailing silence that the "ended" audio will not have. One due in a pause waits for the speech.
        if (self._started and self._every and self._silence_start is None
                and end - self._speech_start >= self._next_partial):
            events.append(self._event("partial", end))
            self._next_partial = ((end - self._speech_start) // self._every + 1) * self._every

    def _end_of_turn(self) -> bool | None:
        """End-of-turn judgement of the speech before the current silence, made once per silence run (when the
        judgement is on): True finished, False unfinished, None neither (too little to judge, a barge-in word)."""
        if not self._judged and self._hold_silence > self._end_silence:
            # Up to now (at least two windows into the silence), not to the start of the silence: a soft final
            # fall is often already below end_threshold.
            speech = self._history.view(self._audio_start, self._done)
            spoken = self._silence_start - self._audio_start + self._pad
            short = self.answering and spoken <= self._barge_in_max  # a barge-in word: no hold
            self._finished = None if short or not self._started else end_of_turn(speech, self.config.end_of_turn_ratio)
            self._judged = True
        return self._finished

    def _silence_for(self, finished: bool | None) -> int:
        """Samples of silence that end a segment judged `finished` (None: not judged, or no judgement)."""
        return self._complete_silence if finished else self._hold_silence if finished is False else self._end_silence

    def _close(self, end: int, events: list[SpeechEvent]) -> None:
        """End the open segment at sample `end`: reported if it had started, silently dropped otherwise."""
        if self._started:
            events.append(self._event("ended", end))
            self._segment += 1
            self._floor = end
        self._open = self._started = self._judged = self._paused = False
        self._silence_start = self._finished = None

    def _event(self, kind: Literal["partial", "paused", "ended"], end: int) -> SpeechEvent:
        audio = self._history.view(self._audio_start, end).copy()
        return SpeechEvent(kind, self._audio_start / SAMPLE_RATE, end / SAMPLE_RATE, audio, self._segment)


def _check_chunk(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    """A validated float32 copy-free view of one pushed chunk."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    if not isinstance(samples, np.ndarray):
        raise InvalidInputError(f"audio chunk must be a numpy array or torch tensor; got {type(samples).__name__}")
    if samples.ndim != 1:
        raise InvalidInputError(f"audio chunk must be 1-D mono samples; got shape {samples.shape}")
    if samples.dtype.kind != "f":
        raise InvalidInputError(
            f"audio chunk must be float32 in [-1, 1]; got {samples.dtype} "
            "(convert PCM16 with vita.processing.audio.pcm16_to_float)"
        )
    x = samples.astype(np.float32, copy=False)
    if x.size:
        if not np.isfinite(x).all():
            raise InvalidInputError("audio chunk contains NaN or Inf samples")
        peak = float(np.abs(x).max())
        if peak > _UNSCALED_PEAK:
            raise InvalidInputError(
                f"audio chunk peaks at {peak:g}; samples must lie in [-1, 1] (int16 values not divided by 32768?)"
            )
    return x


def speech_segments(samples: np.ndarray | torch.Tensor, config: VADConfig | None = None) -> list[SpeechEvent]:
    """The "ended" events of a whole 16 kHz clip (push + flush): offline use and tests."""
    vad = StreamingVAD(config)
    events = vad.push(samples) + vad.flush()
    return [e for e in events if e.kind == "ended"]
