"""One training or evaluation example, whatever its source: the unit every manifest line, loader and stage shares.

The conversation is VITA's turn list. User turns hold placeholders (`<image>`, `<video>`, `<audio>`) in the order the
media lists give them (`Message.from_markup` reads them; only these three are markup, any other text stays text);
bot turns hold the answer *without* the state token: `state` says which token the last bot turn starts with when the
trainer builds its target (`Message("bot", content, state=StateToken(state))`), so the same sample can be trained
with or without state tokens. A `<2>` (noisy, non-query) sample's last bot turn is empty: the target
is `<2>` then end-of-sequence. A `system` turn, if present, comes first and overrides the per-data-type default.

Paths (`images`, `video`, `audio`) are absolute once a manifest is read (manifests store them relative to the
manifest file). An audio path may carry a time range as a media fragment, `clip.opus#t=20.08,24.40` (seconds), for
corpora whose segments are cut from long recordings (WenetSpeech, GigaSpeech); `vita.training.data.load_audio_ref`
reads either form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("text", "image", "video", "asr", "caption", "duplex")
ROLES = ("system", "user", "bot")
STATES = ("<1>", "<2>", "<3>")


@dataclass
class Sample:
    kind: str  # "text", "image", "video", "asr", "caption", "duplex"
    conversation: list[dict]  # {"role": "system"|"user"|"bot", "content": str with <image>/<video>/<audio> placeholders}
    images: list[str] = field(default_factory=list)
    video: str | None = None
    audio: list[str] = field(default_factory=list)
    state: str | None = None  # "<1>" query audio, "<2>" noisy audio, "<3>" text; None: no state token
    meta: dict[str, str] = field(default_factory=dict)  # free-form: id, source, task, language, split
    # Where it was read ("manifest.jsonl:12"), for errors found later (undecodable media); not written back.
    origin: str | None = field(default=None, compare=False, repr=False)

    @property
    def answer(self) -> str:
        """The last bot turn's content: the reference answer in evaluation."""
        for turn in reversed(self.conversation):
            if turn["role"] == "bot":
                return turn["content"]
        return ""
