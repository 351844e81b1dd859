"""The audio-encoder and vision-encoder services: one `Encoder` per tower behind a Redis worker and a KServe port."""
