"""Quantized weights' tests: the shared helpers of tests/ are importable from here."""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
