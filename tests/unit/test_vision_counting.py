"""benchmarks/vision_counting.py: its shape centres are the rendered pictures', its count maps total the count."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import load_benchmark

from vita.model.config import VitaConfig
from vita.model.vision import VisionEncoder
from vita.training import curriculum as cur
from vita.training.vision_pretrain import load_vision_encoder

ROOT = Path(__file__).resolve().parents[2]
vision_counting = load_benchmark("vision_counting")


def test_the_centres_are_inside_the_drawn_shapes_and_as_many_as_the_count() -> None:
    rng = random.Random(5)
    for _ in range(60):
        spec = dict(cur.image_spec(rng), task="count", count=rng.randint(1, 6), word=None)
        pixels = np.asarray(cur.render_image(spec)).astype(int)
        centres = vision_counting.shape_centres(spec)
        assert len(centres) == spec["count"]
        for cx, cy in centres:
            x, y = int(cx * cur.IMAGE_SIZE), int(cy * cur.IMAGE_SIZE)
            assert (pixels[y, x] == cur.COLOURS[spec["colour"]]).all(), (spec, cx, cy)


def test_count_maps_total_the_count() -> None:
    centres = [(0.1, 0.1), (0.5, 0.52), (0.9, 0.3)]
    density = vision_counting.count_map(centres, 8, "density")
    flags = vision_counting.count_map(centres, 8, "centres")
    assert abs(float(density.sum()) - 3) < 1e-5
    assert sorted(flags.nonzero().flatten().tolist()) == [0, 2 * 8 + 7, 4 * 8 + 4]  # row-major (y, x)


def test_the_script_runs_reports_its_scores_and_saves_an_encoder_stage_2_loads(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vision_counting.py"), "--steps", "2",
                          "--pictures", "48", "--count-map", "centres", "--threads", "1",
                          "--save", str(tmp_path / "encoder")],
                         capture_output=True, text=True, check=True, cwd=tmp_path, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("count_2_6_per_token_head", "count_2_6_mean_head", "count_2_6_map_sum", "centre_tokens_found"):
        assert 0 <= result[key] <= 1, key
    assert len(result["map_sum_mean_by_count"]) == 6
    encoder = VisionEncoder(VitaConfig.preset("tiny-224").vision)
    load_vision_encoder(encoder, tmp_path / "encoder")  # raises if a tensor is missing, extra or misshapen
