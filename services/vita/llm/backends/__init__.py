"""LLM backends: the embedded torch engine (default) and a Triton / TensorRT-LLM client, behind one interface."""
