"""The one budgeted GPU run (issue 10): environment, compiled-kernel correctness, attention
timing (Triton vs SDPA vs compiled FlexAttention), one Wan2.1-1.3B denoising step.

A thin wrapper around ``vidsparse.gpu_suite`` (also ``vidsparse bench --suite``); see
benchmarks/README.md, section "The one GPU run".

    python benchmarks/gpu_suite.py --budget-s 480 --out-dir /tmp/suite            # on the GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --dry-run --out-dir /tmp/dry  # CPU (CI)
    python benchmarks/gpu_suite.py --render benchmarks/results/gpu_suite.json       # Markdown only
"""

import sys

from vidsparse.gpu_suite import main

if __name__ == "__main__":
    sys.exit(main())
