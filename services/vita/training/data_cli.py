"""`vita data`: turn a public corpus in its published layout into a JSONL manifest, and check manifests.

    vita data convert llava llava_v1_5_mix665k.json --media-dir /data/coco --output data/llava.jsonl
    vita data convert wenetspeech WenetSpeech.json --subsets L --min-confidence 0.95 --output data/asr_zh.jsonl
    vita data check data/llava.jsonl data/asr_zh.jsonl

A stage config then lists the manifest under `data.manifests`. `convert` uses the loaders of `vita.training.data`
(the layouts are in docs/training.md, "Data"); `check` reads every line as a stage would and decodes every
medium once, so bad data is found before a long run starts, as one line naming the file and line (exit 2).
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable
from pathlib import Path

from vita.training.sample import Sample

FORMATS = ("llava", "wenetspeech", "gigaspeech", "wavcaps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("convert", help="a public corpus's file -> a JSONL manifest",
                           description="Reads a corpus file in its published layout and writes the samples as a "
                                       "JSONL manifest, media paths relative to the manifest. Prints the count.")
    p.add_argument("format", choices=FORMATS, help="the corpus's layout")
    p.add_argument("source", help="the corpus's JSON file (llava_v1_5_mix665k.json, WenetSpeech.json, "
                                  "GigaSpeech.json, a WavCaps json_files/*.json)")
    p.add_argument("--output", required=True, help="the manifest to write (.jsonl)")
    p.add_argument("--media-dir", default=None,
                   help="llava: the images' root; wavcaps: the audio clips' folder (default: the JSON's folder)")
    p.add_argument("--subsets", default=None,
                   help="wenetspeech/gigaspeech: comma-separated subsets to keep (e.g. L or XL,DEV); default all")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="wenetspeech: drop segments below this confidence (default: %(default)s)")
    p.add_argument("--no-check-files", action="store_true",
                   help="do not require the media files to exist (they are copied in later)")
    p = actions.add_parser("check", help="read manifests as a stage would and decode every medium once",
                           description="Validates every line of each manifest and decodes each image, audio "
                                       "(range), and video once; prints the samples per manifest and kind.")
    p.add_argument("manifests", nargs="+", help="JSONL manifests")


def main(args: argparse.Namespace) -> None:
    if args.action == "convert":
        samples = convert(args.format, args.source, media_dir=args.media_dir,
                          subsets=args.subsets.split(",") if args.subsets else None,
                          min_confidence=args.min_confidence, check_files=not args.no_check_files)
        from vita.training.data import write_manifest

        path = write_manifest(args.output, samples)
        kinds = collections.Counter(s.kind for s in samples)
        print(f"{path}: {len(samples)} samples ({_counts(kinds)})")
    else:
        for manifest in args.manifests:
            kinds = check(manifest)
            print(f"{manifest}: {sum(kinds.values())} samples ({_counts(kinds)}), media decoded")


def convert(fmt: str, source: str | Path, *, media_dir: str | Path | None = None,
            subsets: list[str] | None = None, min_confidence: float = 0.0, check_files: bool = True) -> list[Sample]:
    """The samples of `source` read by the loader of `fmt` (one of FORMATS); `DataError` on bad data."""
    from vita.training import data

    loaders: dict[str, Callable[[], list[Sample]]] = {
        "llava": lambda: data.load_llava(source, media_dir, check_files=check_files),
        "wenetspeech": lambda: data.load_wenetspeech(source, subsets, min_confidence=min_confidence,
                                                     check_files=check_files),
        "gigaspeech": lambda: data.load_gigaspeech(source, subsets, check_files=check_files),
        "wavcaps": lambda: data.load_wavcaps(source, media_dir, check_files=check_files),
    }
    if fmt not in loaders:
        raise data.DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    samples = loaders[fmt]()
    if not samples:
        raise data.DataError(f"{source}: no samples" + (f" in subsets {', '.join(subsets)}" if subsets else ""))
    return samples


def check(manifest: str | Path) -> collections.Counter[str]:
    """Samples per kind of a manifest whose lines and media are all good; `DataError` naming the first bad line."""
    from vita.training.data import check_media, read_manifest

    samples = read_manifest(manifest)
    check_media((kind, ref, sample.origin or "") for sample in samples
                for kind, ref in [*(("image", p) for p in sample.images), *(("audio", a) for a in sample.audio),
                                  *([("video", sample.video)] if sample.video else [])])
    return collections.Counter(s.kind for s in samples)


def _counts(kinds: collections.Counter[str]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
