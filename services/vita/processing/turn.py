"""End-of-turn judgement from prosody: does the speech so far sound finished, or did the speaker only pause?

A voice-activity detector ends a turn after a fixed silence, so a speaker who hesitates mid-sentence ("what is on
the ... table") gets two turns and two answers. Turn detectors hold the turn open when the words so far look
unfinished: LiveKit's turn detector reads the transcript with a small language model, Pipecat's smart-turn reads
the audio with a wav2vec2 classifier. This stack has no transcript, and a learned detector would need data and
weights we do not have, so this module uses the oldest audio cue of all, *final lowering*: a declarative sentence
or a wh-question ends with the pitch falling to the bottom of the speaker's range, while a phrase cut off
mid-sentence stays level or rises ("continuation rise").

`final_pitch_ratio` is the lowest F0 of the last 100 ms of voiced speech over the median F0 of the whole
utterance. Measured on espeak-ng (the test suite's query voice, the 32 questions of `vita.training.speech` whole
and cut at half their words with an SSML `<break time="550ms"/>`): whole questions end at 0.82 or below, the cut
halves at 0.86 or above; `END_OF_TURN_RATIO` (0.835) sits between. (The median of that tail instead of its lowest
value, or a 50 ms tail, left no gap.) A pitch-halving error of the tracker makes the ratio small: the safe side,
no hold. Real voices are more varied (questions with a final rise, creaky voice that defeats the pitch
tracker): the cost of a wrong "unfinished" is only the longer hold before the answer (`incomplete_silence_ms`),
and an utterance too short or too unvoiced to measure counts as finished (no hold).

A measured fall also shortens the wait: the VAD ends such speech after `complete_silence_ms` (160 ms) instead of
`end_silence_ms` (400 ms), the pattern of turn detectors that end a turn sooner when confident (AssemblyAI's
`min_end_of_turn_silence_when_confident`, 160 ms in its fast preset). Speech that cannot be measured keeps the
plain end silence.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
BARGE_IN_VOICED_S = 0.03  # a barge-in word has at least this much voiced speech (a brisk "stop": 0.04 s)
END_OF_TURN_RATIO = 0.835  # final F0 / median F0 at or below this: the speech sounds finished

_WIN, _HOP, _FFT = 640, 160, 2048  # 40 ms frames every 10 ms; FFT long enough for a linear autocorrelation
_F0_MIN, _F0_MAX = 60.0, 400.0  # Hz: the pitch range searched
_VOICING = 0.3  # autocorrelation peak / energy at or above this: a voiced frame
_MIN_VOICED = 15  # frames (150 ms): less than this is too little to judge
_TAIL = 10  # voiced frames (100 ms) at the end whose pitch is compared
_ANALYSED_S = 4.0  # only the last seconds of a long segment are analysed (bounded cost)


def pitch_track(samples: np.ndarray) -> np.ndarray:
    """F0 in Hz per 10 ms frame of 16 kHz float samples (NaN for unvoiced or quiet frames); shape (frames,)."""
    x = np.asarray(samples, dtype=np.float32)[-int(_ANALYSED_S * SAMPLE_RATE):]
    if len(x) < _WIN:
        return np.full(0, np.nan)
    n = 1 + (len(x) - _WIN) // _HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, _WIN)[::_HOP][:n]
    frames = frames - frames.mean(axis=1, keepdims=True)
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = rms >= 0.15 * max(float(np.percentile(rms, 95)), 1e-4)  # relative gate: any input level
    spectrum = np.fft.rfft(frames, _FFT)
    ac = np.fft.irfft(np.abs(spectrum) ** 2, _FFT)[:, : _WIN]
    lo, hi = int(SAMPLE_RATE / _F0_MAX), int(SAMPLE_RATE / _F0_MIN)
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    peak = ac[np.arange(n), lag]
    voiced = loud & (peak >= _VOICING * np.maximum(ac[:, 0], 1e-12))
    return np.where(voiced, SAMPLE_RATE / lag, np.nan)


def final_pitch_ratio(samples: np.ndarray) -> float | None:
    """Lowest F0 of the last 100 ms of voiced speech over the utterance's median F0; None when there is too little
    voiced speech to tell (`samples`: 16 kHz float32, the utterance up to where the silence began)."""
    f0 = pitch_track(samples)
    voiced = f0[~np.isnan(f0)]
    if len(voiced) < _MIN_VOICED:
        return None
    return float(np.min(voiced[-_TAIL:]) / np.median(voiced))


def voiced_seconds(samples: np.ndarray) -> float:
    """Seconds of voiced (pitched) speech in 16 kHz float samples: a spoken word has a vowel; a click or a burst of
    hiss has none (low-frequency noise and hum do pass for voiced: this is no noise detector)."""
    f0 = pitch_track(samples)
    return float(np.count_nonzero(~np.isnan(f0)) * _HOP / SAMPLE_RATE)


def end_of_turn(samples: np.ndarray, ratio: float = END_OF_TURN_RATIO) -> bool | None:
    """True: the utterance ends with a final fall (finished); False: level or rising (cut off mid-sentence); None:
    too little voiced speech to tell."""
    measured = final_pitch_ratio(samples)
    return None if measured is None else measured <= ratio


def sounds_finished(samples: np.ndarray, ratio: float = END_OF_TURN_RATIO) -> bool:
    """Whether the utterance ends with a final fall (or cannot be judged): commit the turn without a longer hold."""
    return end_of_turn(samples, ratio) is not False
