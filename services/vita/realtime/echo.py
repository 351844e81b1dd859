"""Echo guard: the assistant's own voice, coming back through the client's microphone, is taken out of the input
before the VAD hears it, so it neither interrupts the answer nor gets answered; a person talking over it still is.

The server knows exactly what it said (the TTS audio it sent) but not when the client played it. The model: the
client plays each piece of audio as it arrives, back to back, and streams its microphone in real time, so the input
sample count is the clock: audio sent when `pos` input samples had arrived plays from `max(pos, end of the previous
piece)` on. The echo is that reference delayed by the client's buffering and the room, and scaled: the delay is
found by cross-correlating the last second of input with the reference (lags 0 to `max_delay_ms`), every quarter
second; the scale per chunk by least squares, and the scaled, delayed reference is subtracted. A client or a
gateway that falls behind on a busy machine moves the delay by hundreds of milliseconds mid-answer (a piece reaches
a client whose playback already ran dry): a chunk that matches weakly at the current delay is matched on its own
against every lag, and a lag at which the echo dominates it becomes the delay, so a move leaks one chunk, not the
second a whole-window estimate needs to notice it. A chunk that does not correlate with the reference (nothing was
played, or the client stopped playing at an interruption) is left as it is, and so is one a person talks over.

This removes a delayed, scaled copy exactly (a loopback, a softphone mixing its output into its input); a room's
reverberation needs an adaptive filter (browsers' getUserMedia echoCancellation does that on the client side).
"""

from __future__ import annotations

import numpy as np

from vita.realtime.tts import SAMPLE_RATE, resample_pcm16

_MIN_CORRELATION = 0.2  # below this, the chunk holds no echo worth removing
_SILENT = 1e-6  # mean square of float samples below which a signal counts as silence
_FOLLOW_CORRELATION = 0.6  # a new delay is taken only from a chunk the echo dominates (not one a person talks over)


class EchoGuard:
    def __init__(self, rate: int, *, max_delay_ms: int = 2000, window_ms: int = 1000) -> None:
        self.rate = rate
        self.max_delay = rate * max_delay_ms // 1000
        self.window = rate * window_ms // 1000
        self.pos = 0  # input samples received so far: the clock
        self.delay: int | None = None  # samples, once estimated
        self._estimate_at = 0  # input position of the next delay estimate (every quarter window)
        self._ref = np.zeros(0, np.float32)  # reference covering input positions [_ref_start, _ref_start + len)
        self._ref_start = 0
        self._ref_end = 0  # where the last piece played ends
        self._input = np.zeros(0, np.float32)  # the last `window` input samples
        self._carry = b""

    def played(self, pcm: bytes, rate: int = SAMPLE_RATE) -> None:
        """Audio sent to the client (PCM16 at `rate`): it will play after what was sent before."""
        samples = _floats(resample_pcm16(pcm, rate, self.rate))
        start = max(self.pos, self._ref_end)
        self._reference_until(start + len(samples))
        offset = start - self._ref_start
        self._ref[offset:offset + len(samples)] += samples
        self._ref_end = start + len(samples)

    def process(self, pcm: bytes) -> bytes:
        """One chunk of microphone PCM16 (at `rate`) with the echo removed; an odd trailing byte waits."""
        data = self._carry + pcm
        usable = len(data) - len(data) % 2
        self._carry = data[usable:]
        x = _floats(data[:usable])
        start, self.pos = self.pos, self.pos + len(x)
        self._input = np.concatenate([self._input, x])[-self.window:]
        self._forget(start - self.window - self.max_delay)
        if not len(x) or self._ref_end <= start - self.max_delay:
            return data[:usable]  # nothing played lately: nothing to remove
        if self.delay is None or self.pos >= self._estimate_at:
            lag = self._lag()
            if lag is not None:
                self.delay, self._estimate_at = lag, self.pos + self.window // 4
        y = None if self.delay is None else self._cancel(x, start, self.delay)
        if y is None or float(y @ y) > (1 - _FOLLOW_CORRELATION ** 2) * float(x @ x):  # a weak match at best
            moved = self._follow(x, start, y)
            y = y if moved is None else moved
        if y is None:
            return data[:usable]
        return np.clip((y * 32768.0).round(), -32768, 32767).astype("<i2").tobytes()

    # ------------------------------------------------------------------------------------------------------------

    def _follow(self, x: np.ndarray, start: int, current: np.ndarray | None) -> np.ndarray | None:
        """A chunk that matches weakly or not at all at the current delay: has the delay moved (a client or a
        gateway that fell behind)? The lag at which the reference best matches this chunk alone (the rest of the
        window still matches the old delay, and so would a whole-window estimate until the window has filled with
        the new one, so the next one waits that long) is taken if the echo dominates the chunk there (not a person
        talking over it) and it removes more than the current delay did (`current`: what that left). None: the
        delay stays."""
        lag = self._lag(len(x))
        y = None if lag is None or lag == self.delay else self._cancel(x, start, lag, _FOLLOW_CORRELATION)
        if y is None or (current is not None and float(y @ y) >= float(current @ current)):
            return None
        self.delay, self._estimate_at = lag, self.pos + self.window
        return y

    def _cancel(self, x: np.ndarray, start: int, delay: int, least: float = _MIN_CORRELATION) -> np.ndarray | None:
        """`x` (input from position `start`) less the reference at `delay`, scaled by least squares; None when `x`
        correlates with the reference there less than `least`."""
        r = self._reference(start - delay, len(x))
        rr, xr = float(r @ r), float(x @ r)
        if rr / len(x) < _SILENT or xr <= 0 or xr / np.sqrt(rr * float(x @ x) + 1e-20) < least:
            return None
        return x - min(xr / rr, 2.0) * r

    def _lag(self, recent: int | None = None) -> int | None:
        """The delay (samples, 0..max_delay) at which the last second of input (or its last `recent` samples)
        best matches the reference; None when the normalised cross-correlation stays under `_MIN_CORRELATION`
        (nothing echoes) or there is too little input."""
        x = self._input[-recent:] if recent else self._input
        n = len(x)
        ref = self._reference(self.pos - n - self.max_delay, n + self.max_delay)
        power = float(x @ x)
        if n < (recent or self.window // 4) or float(ref @ ref) / len(ref) < _SILENT or power / n < _SILENT:
            return None
        size = 1 << int(np.ceil(np.log2(len(ref) + n)))
        spectrum = np.fft.rfft(ref, size) * np.conj(np.fft.rfft(x, size))
        corr = np.fft.irfft(spectrum, size)[:self.max_delay + 1]
        energy = np.concatenate([[0.0], np.cumsum(ref.astype(np.float64) ** 2)])
        local = energy[n:n + self.max_delay + 1] - energy[:self.max_delay + 1]  # reference energy under each lag
        score = corr / np.sqrt(np.maximum(local, 1e-12) * power)
        k = int(np.argmax(score))
        return self.max_delay - k if score[k] >= _MIN_CORRELATION else None

    def _reference(self, start: int, length: int) -> np.ndarray:
        """The reference at input positions [start, start + length), zeros where nothing was playing."""
        out = np.zeros(length, np.float32)
        lo, hi = max(start, self._ref_start), min(start + length, self._ref_start + len(self._ref))
        if hi > lo:
            out[lo - start:hi - start] = self._ref[lo - self._ref_start:hi - self._ref_start]
        return out

    def _reference_until(self, end: int) -> None:
        if end > self._ref_start + len(self._ref):
            self._ref = np.concatenate([self._ref, np.zeros(end - self._ref_start - len(self._ref), np.float32)])

    def _forget(self, before: int) -> None:
        if before > self._ref_start:
            drop = min(before - self._ref_start, len(self._ref))
            self._ref = self._ref[drop:]
            self._ref_start = self._ref_start + drop if len(self._ref) else before


def _floats(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
