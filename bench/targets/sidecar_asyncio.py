"""`reditus-sidecar serve` on the plain asyncio loop even where uvloop is installed,
so the sidecar and the bare aiohttp ceiling can be compared on the same loop type.

    python bench/targets/sidecar_asyncio.py      (configured from the environment)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.modules["uvloop"] = None  # type: ignore[assignment]  # makes `import uvloop` fail
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sidecar.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve"]))
