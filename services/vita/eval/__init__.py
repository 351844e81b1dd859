"""`vita eval`: score a model on the curriculum's held-out split and on the paper's benchmarks.

Layering: this package uses `vita.inference` (the model), `vita.processing` and `vita.training.data` (manifests);
nothing in the services or the training stages imports it. Every benchmark is a `Benchmark` (a loader that reads
the published file layout into `Item`s, and a scorer); the model is reached through an `Answerer`, so tests can
score a scripted answer function whose result is known, and the CLI scores the real model.
"""
