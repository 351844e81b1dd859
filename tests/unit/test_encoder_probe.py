"""benchmarks/encoder_probe.py: its question parsing matches the curriculum, and its linear probe reads what is there."""

from __future__ import annotations

import torch
from conftest import load_benchmark

from vita.training.curriculum import IMAGE_QUESTIONS

encoder_probe = load_benchmark("encoder_probe")


def test_every_curriculum_question_maps_to_its_task() -> None:
    for task, questions in IMAGE_QUESTIONS.items():
        for question in questions:
            assert encoder_probe.task_of(question) == task, question


def test_the_probe_reads_a_label_the_features_hold_and_not_one_they_lack() -> None:
    g = torch.Generator().manual_seed(0)
    labels = [str(k % 4) for k in range(400)]
    features = torch.randn(400, 32, generator=g)
    features[:, 5] += 6.0 * torch.tensor([float(a) for a in labels])  # the class, in one direction
    train, test = features[:300], features[300:]
    fit, heldout = encoder_probe.linear_probe(train, labels[:300], test, labels[300:])
    assert fit >= 0.95 and heldout >= 0.95
    noise = torch.randn(400, 32, generator=g)  # features that know nothing of the labels
    fit, heldout = encoder_probe.linear_probe(noise[:300], labels[:300], noise[300:], labels[300:])
    assert heldout <= 0.45  # chance is 0.25, whatever the fit
