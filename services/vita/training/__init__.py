"""Training jobs. VITA is trained in three stages (MISSION.md, "Training"):

1. LLM instruction tuning: vocabulary extension, then bilingual text instructions.
2. Multimodal alignment: the vision connector on captions; the audio encoder and connector on ASR and captioning.
3. Multimodal instruction tuning: spoken questions, one system prompt per data type, and state tokens with
   noisy-audio negatives that teach the duplex behaviour.

`vita.training.duplex` is the duplex part of stage 3, on synthetic data made here (`vita.training.speech`:
espeak-ng speech and generated noise): it fine-tunes the tiny model so that its first answer token really is its
judgement of the speech, `<1>` for a question to the assistant (then the answer) and `<2>` then end-of-sequence
for anything else.
"""
