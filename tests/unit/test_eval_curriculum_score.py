"""The learning-proof eval's scoring: rejection broken down by what was heard, the chatter let through counted."""

from __future__ import annotations

from vita.eval.answer import Answer
from vita.eval.curriculum import sample_item, score
from vita.training.sample import Sample


def chatter(meta: dict) -> Sample:
    return Sample("duplex", [{"role": "user", "content": "<audio>"}, {"role": "bot", "content": ""}],
                  audio=["a.wav"], state="<2>", meta={"category": "chatter", **meta})


def test_rejection_is_broken_down_by_language_and_the_chatter_let_through_is_counted_by_phrase_and_voice() -> None:
    samples = [
        chatter({"task": "speech", "language": "en", "voice": "en-m-low", "text": "honey did you feed the cat"}),
        chatter({"task": "speech", "language": "en", "voice": "en-m-low", "text": "honey did you feed the cat"}),
        chatter({"task": "speech", "language": "en", "voice": "en-f-fast", "text": "pass me the salt please"}),
        chatter({"task": "speech", "language": "zh", "voice": "zh", "text": "把门关上好吗"}),
        chatter({"task": "noise", "noise": "pink"}),
        chatter({"task": "noise", "noise": "hum"}),
    ]
    items = [sample_item(s, f"chatter-{k}") for k, s in enumerate(samples)]
    states = ["<1>", "<1>", "<2>", "<3>", "<2>", "<1>"]  # anything but <2> is taken for a question
    metrics, correct = score(items, [Answer("", state) for state in states])
    assert correct == [False, False, True, False, True, False]
    assert metrics["nonquery_rejection"] == 2 / 6
    assert metrics["nonquery_rejection/en"] == 1 / 3
    assert metrics["nonquery_rejection/zh"] == 0.0
    assert metrics["nonquery_rejection/noise"] == 0.5
    assert metrics["nonquery_accepted"] == {"honey did you feed the cat (en-m-low)": 2, "把门关上好吗 (zh)": 1,
                                            "noise (hum)": 1}
    assert next(iter(metrics["nonquery_accepted"])) == "honey did you feed the cat (en-m-low)"  # most often first
    assert items[0].info["voice"] == "en-m-low" and "voice" not in sample_item(
        Sample("text", [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], state="<3>",
               meta={"voice": "en-m"}), "text-0").info  # only chatter carries what was heard


def test_a_manifest_without_chatter_meta_still_scores_rejection() -> None:
    items = [sample_item(chatter({}), "c-0"), sample_item(chatter({}), "c-1")]
    metrics, _ = score(items, [Answer("", "<2>"), Answer("", "<1>")])
    assert metrics["nonquery_rejection"] == 0.5 and metrics["nonquery_rejection/all"] == 0.5
    assert metrics["nonquery_accepted"] == {"c-1": 1}
