"""The pieces of the access checks and connection settings that need no server: token files and the bearer
header, the token bucket's arithmetic, the TLS and Redis settings' validation, the input limits' header probes."""

from __future__ import annotations

import struct

import pytest

from vita.bus.acl import acl_rule
from vita.errors import InvalidInputError, VitaError
from vita.orchestrator.limits import InputLimits, audio_seconds, image_size, video_seconds
from vita.runtime.access import TokenBucket, TokenSet, bearer_token, load_tokens, token_id
from vita.runtime.redis_client import RedisSettings, redacted
from vita.runtime.tls import server_tls
from vita.v1.media_pb2 import Audio


def test_token_file_and_bearer_header(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# operators\nalpha\n\n  beta  \n")
    assert load_tokens(path) == {"alpha", "beta"}
    path.write_text("# nothing\n")
    with pytest.raises(VitaError, match="holds no token"):
        load_tokens(path)
    with pytest.raises(VitaError, match="cannot read"):
        load_tokens(tmp_path / "missing")
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    tokens = TokenSet(["alpha", "beta"])
    assert "alpha" in tokens and "alph" not in tokens and None not in tokens
    assert token_id("alpha") != token_id("beta") and "alpha" not in token_id("alpha")


def test_token_bucket_allows_the_burst_then_the_rate():
    bucket = TokenBucket(rate=2.0, burst=3.0, updated=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one call refills in 1/rate s
    assert bucket.take(100.5) == 0.0
    assert bucket.take(100.5) == pytest.approx(0.5)
    assert [bucket.take(110.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # a long pause saves up only `burst`


def test_tls_flags_must_make_a_whole(tmp_path):
    assert server_tls(None, None, None) is None
    with pytest.raises(VitaError, match="go together"):
        server_tls("cert.pem", None, None)
    with pytest.raises(VitaError, match="needs --tls-cert"):
        server_tls(None, None, "ca.pem")


def test_redis_settings_validation(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert RedisSettings("rediss://vita:pw@host:6380/0", ca_file=str(ca)).ca_file == str(ca)
    with pytest.raises(VitaError, match="redis:// or rediss://"):
        RedisSettings("http://host")
    with pytest.raises(VitaError, match="need a rediss:// URL"):
        RedisSettings("redis://host", ca_file=str(ca))
    with pytest.raises(VitaError, match="does not exist"):
        RedisSettings("rediss://host", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(VitaError, match="only database 0"):
        RedisSettings("redis://host/3", cluster=True)
    assert redacted("redis://vita:s3cret@host:1/0") == "redis://vita:***@host:1/0"
    with pytest.raises(VitaError, match=r"\*\*\*"):  # the password never reaches a message
        RedisSettings("http://vita:s3cret@host")


def _wav(seconds: float, rate: int = 16000) -> bytes:
    data = b"\0\0" * round(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


def test_media_sizes_come_from_headers(tmp_path, wide_png, short_mp4):
    assert image_size(wide_png.read_bytes()) == (896, 448)
    assert image_size(b"not an image") is None
    assert audio_seconds(Audio(data=_wav(1.25))) == pytest.approx(1.25)
    assert audio_seconds(Audio(data=b"\0\0" * 8000, encoding=Audio.PCM16, sample_rate_hz=16000)) == 0.5
    assert video_seconds(short_mp4.read_bytes()) == pytest.approx(1.5, abs=0.11)
    assert video_seconds(b"junk") is None


def test_input_limits_must_be_positive():
    with pytest.raises(InvalidInputError, match="max_text_chars"):
        InputLimits(max_text_chars=0)


def test_the_documented_acl_rule_is_the_one_the_tests_run():
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "deployment.md").read_text()
    assert acl_rule("vita", "vita", ">PASSWORD") in docs
