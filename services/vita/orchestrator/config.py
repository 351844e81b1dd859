"""The orchestrator's settings: one dataclass that Generate, Converse and the pool client all read.

Nothing is copied from it into a second config, so a flag (`--encode-timeout`, ...) reaches every call that waits
on a pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vita.errors import InvalidInputError
from vita.orchestrator.limits import InputLimits
from vita.processing.vad import VADConfig
from vita.v1.assistant_pb2 import SessionConfig, VadParams

# VADConfig fields whose VadParams field has another name.
_VAD_PARAMS_NAMES = {"partial_every_ms": "early_judge_ms"}


@dataclass
class OrchestratorConfig:
    default_max_tokens: int = 256  # when a request or session sets no max_tokens
    encode_timeout_s: float = 60.0  # wait for the encoder pools
    # Longer than the bus's reclaim time: a dead worker's job is redelivered and resumes within this wait.
    token_timeout_s: float = 60.0
    judge_timeout_s: float = 30.0  # Converse: wait for the monitor's one-token judgement
    stop_wait_s: float = 5.0  # Converse: wait for an interrupted generator to confirm it stopped
    vad: VADConfig = field(default_factory=VADConfig)  # Converse: defaults for what a session does not set
    # Converse: start answering when the speech pauses, release the answer when the turn ends (a session may set it).
    preemptive_generation: bool = True
    # Converse: after each answer, have the monitor pool prefill the history into its prefix cache (a call that has
    # sent audio), so that judging the next speech computes the speech only, however long the history.
    prefill_monitor_history: bool = True
    limits: InputLimits = field(default_factory=InputLimits)  # what one request or client event may carry
    # The model directory the model config and tokenizer were read from (`--model`), as ModelMetadata reports it;
    # empty: not known (an in-process service).
    model_dir: str = ""
    # That model's fingerprint (vita.model.fingerprint), sent with every job: a worker serving another model refuses
    # it (FAILED_PRECONDITION). Empty: not sent, not checked.
    model_fingerprint: str = ""


def session_vad(defaults: VADConfig, config: SessionConfig) -> VADConfig:
    """A session's VAD: what the client set in `config.vad`, the orchestrator's defaults for the rest.

    `early_judge_ms`, `incomplete_silence_ms`, `complete_silence_ms` and `barge_in_max_ms`: 0 means the default, a
    negative value switches the feature off (early judging, the end-of-turn hold, its shortening of a finished
    turn's silence, the barge-in rule).
    """
    try:
        return _vad(config.vad, defaults)
    except InvalidInputError as e:  # named as the client set it: SessionConfig.vad.<VadParams field>
        raise InvalidInputError(_vad_params_message(str(e), config.vad, defaults)) from None


def _vad(v: VadParams, defaults: VADConfig) -> VADConfig:
    def switch(value: int, default: int) -> int:
        return default if value == 0 else max(0, value)

    return VADConfig(
        start_threshold=v.start_threshold or defaults.start_threshold,
        end_threshold=v.end_threshold or defaults.end_threshold,
        min_speech_ms=v.min_speech_ms or defaults.min_speech_ms,
        end_silence_ms=v.end_silence_ms or defaults.end_silence_ms,
        speech_pad_ms=v.speech_pad_ms or defaults.speech_pad_ms, max_segment_s=defaults.max_segment_s,
        partial_every_ms=switch(v.early_judge_ms, defaults.partial_every_ms),
        incomplete_silence_ms=switch(v.incomplete_silence_ms, defaults.incomplete_silence_ms),
        complete_silence_ms=switch(v.complete_silence_ms, defaults.complete_silence_ms),
        end_of_turn_ratio=defaults.end_of_turn_ratio,
        barge_in_min_speech_ms=v.barge_in_min_speech_ms or defaults.barge_in_min_speech_ms,
        barge_in_max_ms=switch(v.barge_in_max_ms, defaults.barge_in_max_ms),
    )


def _vad_params_message(message: str, v: VadParams, defaults: VADConfig) -> str:
    """A VADConfig error about a session's VAD in the proto's names (`SessionConfig.vad.start_threshold`), not the
    server's dataclass's."""
    if "max_segment_s" in message:  # the server's segment cap is no client field; the floor and padding are
        return (f"SessionConfig.vad.min_speech_ms + speech_pad_ms ({v.min_speech_ms or defaults.min_speech_ms} + "
                f"{v.speech_pad_ms or defaults.speech_pad_ms} ms) must be at most "
                f"{defaults.max_segment_s * 1000 - 64:g} ms: the server cuts speech at {defaults.max_segment_s:g} s, "
                "and two 32 ms VAD windows must fit too")
    message = re.sub(r"VADConfig\.(\w+)", lambda m: f"SessionConfig.vad.{_VAD_PARAMS_NAMES.get(m[1], m[1])}",
                     message)
    if "must not exceed" in message:  # the pair may hold a server default the client did not set
        message += " (a VadParams field left 0 takes the server default)"
    return message


def session_preemptive(default: bool, config: SessionConfig) -> bool:
    """A session's preemptive generation: its own setting when it made one, else the orchestrator's."""
    return config.preemptive_generation if config.HasField("preemptive_generation") else default
