"""The audio-encoder service: speech from its Redis stream into audio-tower embeddings, 12.5 per second."""
