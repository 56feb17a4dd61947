"""What the benchmark scripts share: the common command-line options and the measurement policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parser(doc: str | None) -> argparse.ArgumentParser:
    """--tiny/--model/--device/--runs/--steps/--size; scripts add their own options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="generated tiny weights (the default without --model)")
    ap.add_argument("--model", help="local diffusers folder or cached repo id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", type=int, default=5, help="measured runs (median reported), after one warm-up")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    return ap


def size(args: argparse.Namespace) -> tuple[int, int]:
    width, height = map(int, args.size.split("x"))
    return width, height
