"""``python -m benchmarks``: the benchmark harness (see benchmarks/harness.py)."""

import sys

from benchmarks.harness import main

sys.exit(main())
