"""Run a module as `python -m` would, then write this process's peak resident memory (VmHWM: the high-water
mark of its own address space, so nothing inherited from the parent that started it) to a file.
Run: python -m bench.baselines.peak RESULT.json MODULE [ARGS...]
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
from pathlib import Path


def high_water_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    result, module, *args = sys.argv[1:]
    atexit.register(lambda: Path(result).write_text(json.dumps({"peak_rss_bytes": high_water_bytes()})))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
