"""Shared test set-up: the repository root on sys.path, and where the real data lives."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Real data sets (PennFudanPed, COCO subsets) are never copied into the repository; CI has them beside it.
SHARED_DATA = os.environ.get("SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
