"""Where a signing request's CPU goes: py-spy samples the sidecar under wrk load and this
prints the share of samples per function (self and inclusive), as in README "Performance".

    .venv/bin/pip install -e '.[bench]'        # py-spy
    .venv/bin/python bench/profile.py [--seconds 8] [--connections 50] [--asyncio]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import common
from common import PYTHON


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        # per function, not per line: "handle (sidecar/api.py:164)" -> "handle (sidecar/api.py)"
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = [f"{total} samples", "", "| self % | function |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in own.most_common(top)]
    lines += ["", "| inclusive % | function (sidecar code and aiohttp's response path) |"]
    lines += ["|---:|---|"]
    ours = [
        (f, n)
        for f, n in inclusive.most_common()
        if "sidecar/" in f or "web_response" in f or "web_protocol" in f
    ]
    lines += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in ours[:top]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio, not uvloop")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is missing: .venv/bin/pip install -e '.[bench]'")
    launcher = (
        [PYTHON, str(common.BENCH / "targets" / "sidecar_asyncio.py")]
        if args.asyncio
        else [PYTHON, "-m", "sidecar", "serve"]
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp,
        common.sidecar_file(launcher) as server,
    ):
        raw = Path(tmp) / "profile.txt"
        common.wait_token(server)
        load = threading.Thread(
            target=common.wrk, args=(server, args.connections, args.seconds + 2)
        )
        load.start()
        record = ["record", "-p", str(server.proc.pid), "-d", str(args.seconds)]
        subprocess.run(
            [py_spy, *record, "-r", "500", "--format", "raw", "-o", str(raw)],
            check=True,
            capture_output=True,
        )
        load.join()
        print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
