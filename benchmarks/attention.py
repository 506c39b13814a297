"""Attention kernel benchmark: vidsparse Triton vs SDPA, FlexAttention and NATTEN.

A thin wrapper around ``vidsparse bench`` (same flags); see benchmarks/README.md.

    python benchmarks/attention.py                       # all shapes, patterns, densities
    python benchmarks/attention.py --quick --shapes wan-1.3b --patterns radial
    TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --quick   # smoke run
"""

import sys

from vidsparse.bench import main

if __name__ == "__main__":
    sys.exit(main())
