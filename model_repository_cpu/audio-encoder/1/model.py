"""Triton's entry point for the CPU `audio-encoder` model; the implementation is in the vita package.

Triton's Python backend imports this file in its stub process and looks for `TritonPythonModel`. The code lives in
`vita.encoders.triton_model`; this file only puts the package on sys.path (the `vita_path` parameter of
config.pbtxt) before importing it.
"""

import json
import sys

POOL = "audio-encoder"


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        path = parameters.get("vita_path", {}).get("string_value", "")
        if path and not path.startswith("${") and path not in sys.path:
            sys.path.insert(0, path)
        from vita.encoders.triton_model import EncoderPythonModel

        self._model = EncoderPythonModel(args, POOL)

    def execute(self, requests):
        return self._model.execute(requests)
