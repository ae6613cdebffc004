"""`reditus-sidecar serve` in transit mode with the coalescer's bounds set for a run:

    python bench/targets/sidecar_transit.py MAX_BATCH MAX_IN_FLIGHT   (env configures the rest)

`64 1` is the shipped default; `1 64` sends every token in its own call (no batching,
up to 64 calls in flight), like an app asking transit per token.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sidecar import transit
from sidecar.__main__ import main

if __name__ == "__main__":
    transit.MAX_BATCH, transit.MAX_IN_FLIGHT = int(sys.argv[1]), int(sys.argv[2])
    sys.exit(main(["serve"]))
