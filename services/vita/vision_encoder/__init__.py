"""The vision-encoder service: images and video frames from its Redis stream into InternViT embeddings."""
