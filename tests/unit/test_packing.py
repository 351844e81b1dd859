"""Packing: a packed batch gives the loss and gradients of its samples trained one at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests import training_helpers as th
from vita.model.inputs import SlotIds
from vita.model.llm import SHARED_SEGMENT
from vita.processing.tokenizer import Special
from vita.training.examples import IGNORE, ExampleEncoder
from vita.training.forward import TrainingModel, batch_loss_sum
from vita.training.packing import PAD_SEGMENT, Row, collate, pack


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = th.tokenizer()
    model = th.micro_model(tok.vocab_size)
    encoder = ExampleEncoder(tok, model.vita_config)
    examples = [encoder(s, i) for i, s in enumerate(th.mixed_samples(tmp_path_factory.mktemp("media")))]
    slots = SlotIds(tok.image_id, tok.video_id, tok.audio_id)
    return tok, TrainingModel(model, slots), examples


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _packed_and_alone(tok, module, examples, rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of `rows` in one batch, checked against each example alone (1e-5); returns the packed ones."""
    n_targets = sum(e.num_targets for e in examples)
    module.zero_grad(set_to_none=True)
    packed = batch_loss_sum(module, collate(rows, tok.eos_id)) / n_targets
    packed.backward()
    packed_grads = _grads(module)

    module.zero_grad(set_to_none=True)
    alone = torch.zeros(())
    for e in examples:
        loss = batch_loss_sum(module, collate([Row([e])], tok.eos_id)) / n_targets
        loss.backward()
        alone = alone + loss.detach()
    alone_grads = _grads(module)

    assert packed.item() == pytest.approx(alone.item(), abs=1e-5)
    assert packed_grads.keys() == alone_grads.keys()
    for name, g in packed_grads.items():
        torch.testing.assert_close(g, alone_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    return packed.detach(), packed_grads


def test_packed_rows_respect_the_length_and_keep_the_order(setup):
    _, _, examples = setup
    length = max(len(e) for e in examples) + 40
    rows = list(pack(examples, length))
    assert [e.index for r in rows for e in r.examples] == [e.index for e in examples]
    assert len(rows) < len(examples)
    assert all(len(r) <= length for r in rows)
    assert [len(r.examples) for r in pack(examples, length, enabled=False)] == [1] * len(examples)


def test_video_is_never_packed(setup):
    _, _, examples = setup
    video = type(examples[0])(input_ids=[1, 5, 6], targets=[IGNORE, 6, IGNORE], kind="video", index=99)
    rows = list(pack([examples[0], video, examples[1]], 10_000))
    assert [[e.index for e in r.examples] for r in rows] == [[examples[0].index], [99], [examples[1].index]]


def test_positions_restart_and_padding_is_its_own_segment(setup):
    tok, _, examples = setup
    batch = collate([Row(examples[:3])], tok.eos_id)
    a, b = len(examples[0]), len(examples[1])
    assert batch.positions[0, :a].tolist() == list(range(a))
    assert batch.positions[0, a : a + b].tolist() == list(range(b))
    assert batch.segment_ids[0, :a].unique().tolist() == [0]
    assert batch.segment_ids[0, a : a + b].unique().tolist() == [1]
    n = sum(len(e) for e in examples[:3])
    assert (batch.segment_ids[0, n:] == PAD_SEGMENT).all() and (batch.targets[0, n:] == IGNORE).all()


def test_packed_loss_and_gradients_equal_one_by_one(setup):
    """Text, image, audio and a two-turn conversation packed into two rows (with padding) vs each alone."""
    tok, module, examples = setup
    rows = list(pack(examples, packing_length=sum(len(e) for e in examples) // 2 + 50))
    assert len(rows) >= 2 and any(len(r.examples) > 2 for r in rows)
    _, packed_grads = _packed_and_alone(tok, module, examples, rows)
    # every part of the model took part: towers, connectors, LLM
    assert any(n.startswith("vita.vision_tower.connector") for n in packed_grads)
    assert any(n.startswith("vita.audio_tower.encoder") for n in packed_grads)


def test_the_loss_is_the_cross_entropy_of_every_position_s_logits(setup):
    """The LM head runs only where a position has a target: the sum of the full logits' cross-entropy with every
    other position ignored, on packed rows with padding."""
    tok, module, examples = setup
    batch = collate(list(pack(examples, packing_length=sum(len(e) for e in examples) // 2 + 50)), tok.eos_id)
    assert 0 < (batch.targets != IGNORE).sum() < batch.targets.numel() // 2
    with torch.no_grad():
        embeds = module.embed(batch.input_ids, batch.image_pixels, batch.video_pixels, batch.audio)
        logits = module.vita(inputs_embeds=embeds, positions=batch.positions, segment_ids=batch.segment_ids).logits
        expected = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
        assert batch_loss_sum(module, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_row_holds_the_system_prompt_its_samples_share_once(setup):
    tok, _, examples = setup
    # the shareable context stops before the first media slot and the first target
    for e in examples:
        assert 0 < e.shareable <= len(e)
        assert all(t == IGNORE for t in e.targets[: e.shareable])
        assert not {tok.image_id, tok.audio_id, tok.video_id} & set(e.input_ids[: e.shareable])
    length = sum(len(e) for e in examples)
    plain, = pack(examples, length)
    shared, = pack(examples, length, share_prefix=True)
    # text, image and spoken samples have different system prompts: VITA's opening sentences are what they share
    assert plain.shared == 0 and 50 < shared.shared < min(e.shareable for e in examples)
    assert len(shared) == len(plain) - shared.shared * (len(examples) - 1)
    batch = collate([shared], tok.eos_id)
    p = shared.shared
    assert (batch.segment_ids[0, :p] == SHARED_SEGMENT).all() and batch.positions[0, :p].tolist() == list(range(p))
    a = len(examples[0]) - p
    assert batch.positions[0, p : p + a].tolist() == list(range(p, len(examples[0])))
    assert batch.positions[0, p + a : p + a + 3].tolist() == [p, p + 1, p + 2]
    # with a tighter length the prefix lets more samples into a row
    tight = max(len(e) for e in examples) * 2
    assert len(list(pack(examples, tight, share_prefix=True))) < len(list(pack(examples, tight)))


def test_shared_prefix_rows_give_the_loss_and_gradients_of_one_by_one(setup):
    tok, module, examples = setup
    rows = list(pack(examples, packing_length=sum(len(e) for e in examples) // 3, share_prefix=True))
    assert len(rows) >= 2 and all(r.shared > 50 for r in rows if len(r.examples) > 1)
    packed, _ = _packed_and_alone(tok, module, examples, rows)

    # and it can fail: were the prefix an ordinary segment, the samples after the first would not see it
    batch = collate(rows, tok.eos_id)
    cut = batch.segment_ids.masked_fill(batch.segment_ids == SHARED_SEGMENT, 10_000)
    with torch.no_grad():
        blind = module(batch.input_ids, batch.targets, batch.positions, cut, image_pixels=batch.image_pixels,
                       audio=batch.audio) / sum(e.num_targets for e in examples)
    assert abs(blind.item() - packed.item()) > 1e-3


def test_without_segments_packing_would_leak_across_samples(setup):
    """The check above can fail: with plain causal attention over the packed row the loss differs."""
    tok, module, examples = setup
    row = collate([Row(examples[:4])], tok.eos_id)
    with torch.no_grad():
        isolated = batch_loss_sum(module, row)
        leaky = module(row.input_ids, row.targets, torch.arange(row.input_ids.shape[1])[None], None,
                       image_pixels=row.image_pixels, audio=row.audio)
    assert abs(isolated.item() - leaky.item()) > 1e-3


def test_the_stream_restarts_at_its_cursor_with_the_same_rows(setup, tmp_path):
    from vita.training.stream import RowStream

    tok, module, _ = setup
    encoder = ExampleEncoder(tok, module.vita.vita_config, max_length=300)
    samples = th.mixed_samples(tmp_path)
    samples.append(th.text("long " * 400, "x"))  # too long: skipped, counted

    def stream(cursor=None):
        return RowStream(samples, lambda s, epoch, i: encoder(s, i), packing_length=400, seed=3, cursor=cursor)

    def ids(rows):
        return [[e.input_ids for e in r.examples] for r in rows]

    whole = stream()
    first, rest = whole.take(3), whole.take(9)  # beyond one epoch
    assert whole.skipped >= 1
    again = stream()
    again.take(3)
    resumed = stream(again.cursor)
    assert ids(resumed.take(9)) == ids(rest)
    assert ids(stream().take(3)) == ids(first)


def test_a_bad_sample_is_named(setup, tmp_path):
    from vita.errors import InvalidInputError
    from vita.training.stream import RowStream

    tok, module, _ = setup
    encoder = ExampleEncoder(tok, module.vita.vita_config)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = th.Sample("image", [{"role": "user", "content": "<image>\nWhat?"}, {"role": "bot", "content": "x"}],
                    images=[str(tmp_path / "broken.png")], meta={"id": "img-7"})
    with pytest.raises(InvalidInputError, match=r"training sample 2 of 2 \(in manifest order\): image sample, id "
                                                r"img-7: "):
        RowStream([th.text("a", "b"), bad], lambda s, e, i: encoder(s, i), packing_length=4000, shuffle=False)


def test_the_training_prompt_is_the_serving_prompt(setup, tmp_path):
    """Context up to the answer: the ids VitaProcessor builds for the same request; then state, answer, eos."""
    from vita.processing.processor import VitaProcessor

    tok, module, _ = setup
    config = module.vita.vita_config
    image, tone = th.write_image(tmp_path / "i.png", 3), th.write_tone(tmp_path / "t.wav", 1.1)
    sample = th.Sample("image", [{"role": "user", "content": "<image>\n<audio>What colour is it?"},
                                 {"role": "bot", "content": "red"}], images=[image], audio=[tone], state="<1>")
    example = ExampleEncoder(tok, config)(sample)
    served, _ = VitaProcessor(tok, config)("What colour is it?", images=[image], audio=[tone])
    n = len(served.input_ids)
    assert example.input_ids[:n] == served.input_ids.tolist()
    answer = [tok.state_ids["<1>"], *tok.encode_segments([Special("</s>"), "red"])[1:], tok.eos_id]
    assert example.input_ids[n:] == answer
    assert [t for t in example.targets if t != IGNORE] == answer  # position t predicts token t + 1
    assert example.targets[n - 1] == answer[0] and example.targets[: n - 1] == [IGNORE] * (n - 1)


def test_a_bad_sample_from_a_manifest_is_named_by_its_file_and_line(setup, tmp_path):
    """A new user's try (2026-12-04): a manifest line whose "audio" is a picture failed naming neither the manifest
    nor the line; docs/training.md says data errors name the file and line."""
    from vita.errors import InvalidInputError
    from vita.training.data import read_manifest, write_manifest
    from vita.training.stream import RowStream

    tok, module, _ = setup
    encoder = ExampleEncoder(tok, module.vita.vita_config)
    (tmp_path / "not-audio.wav").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    bad = th.Sample("asr", [{"role": "user", "content": "<audio>Transcribe."}, {"role": "bot", "content": "x"}],
                    audio=[str(tmp_path / "not-audio.wav")])
    manifest = write_manifest(tmp_path / "train.jsonl", [th.text("a", "b"), bad])
    samples = read_manifest(manifest)
    assert samples[1].origin == f"{manifest}:2" and "origin" not in manifest.read_text()
    with pytest.raises(InvalidInputError, match=rf"^{manifest}:2: "):
        RowStream(samples, lambda s, e, i: encoder(s, i), packing_length=4000, shuffle=False)


def test_a_time_range_past_the_recording_is_named_by_its_file_and_line(setup, tmp_path):
    """A user's try (2026-12-04): `long.opus#t=100,120` on a 5 s clip failed naming only the audio file; the range
    is known bad only when decoded, and the error names the manifest line too."""
    from vita.training.data import DataError, read_manifest, write_manifest
    from vita.training.stream import RowStream

    tok, module, _ = setup
    encoder = ExampleEncoder(tok, module.vita.vita_config)
    tone = th.write_tone(tmp_path / "t.wav", 1.0)
    bad = th.Sample("asr", [{"role": "user", "content": "<audio>Transcribe."}, {"role": "bot", "content": "x"}],
                    audio=[f"{tone}#t=100,120"])
    manifest = write_manifest(tmp_path / "train.jsonl", [th.text("a", "b"), bad])
    with pytest.raises(DataError, match=rf"^{manifest}:2: .*t\.wav: the range 100.0-120.0 s holds no audio$"):
        RowStream(read_manifest(manifest), lambda s, e, i: encoder(s, i), packing_length=4000, shuffle=False)


def test_a_sample_too_long_is_skipped_counted_once_and_logged_with_its_origin(setup, tmp_path, caplog):
    from vita.training.data import read_manifest, write_manifest
    from vita.training.stream import RowStream

    tok, module, _ = setup
    encoder = ExampleEncoder(tok, module.vita.vita_config, max_length=300)
    manifest = write_manifest(tmp_path / "train.jsonl", [th.text("a", "b"), th.text("long " * 400, "x")])
    stream = RowStream(read_manifest(manifest), lambda s, e, i: encoder(s, i), packing_length=400, shuffle=False)
    with caplog.at_level("WARNING", logger="vita.training"):
        stream.take(5)  # five epochs of one trainable sample: the long one came round five times
    assert stream.skipped == 1
    skipped = [r for r in caplog.records if r.getMessage() == "sample skipped: too long"]
    assert [r.sample for r in skipped] == [f"{manifest}:2"]
