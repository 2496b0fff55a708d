"""Start-up time of the commands (issue 21): seconds of a fresh process that imports a
command's module, or runs ``--help`` (Hydra lists the config groups and prints the composed
config) or ``--cfg job`` (composition alone), best of ``--repeat``: wall time, and the CPU
time (user + system) of the process, which other load on a shared machine moves far less.

    python -m benchmarks.startup                                  # this checkout's src/
    python -m benchmarks.startup --src /tmp/before/src --src src  # two trees side by side

Each process is ``python -m fpo.commands.X ...`` (what the ``fpo-X`` entry point runs) with
``PYTHONPATH=<src>``, started in an empty temporary folder; the output is a markdown table,
one column per tree (docs/benchmarks.md, "Start-up time").
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Label -> the interpreter's arguments.
CASES = {
    "python -c 'import fpo.commands.train'": ["-c", "import fpo.commands.train"],
    "fpo-train --help": ["-m", "fpo.commands.train", "--help"],
    "fpo-train --cfg job experiment=smoke": [
        "-m",
        "fpo.commands.train",
        "--cfg",
        "job",
        "experiment=smoke",
    ],
    "fpo-cache --help": ["-m", "fpo.commands.cache", "--help"],
    "fpo-eval --help": ["-m", "fpo.commands.eval", "--help"],
}


def seconds(args: list[str], src: Path, cwd: Path) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of one ``python ARGS`` run with ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "WANDB_MODE": "disabled"}
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=True, capture_output=True)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, action="append", help="a tree's src/ (repeatable)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="the cases whose label contains this")
    args = parser.parse_args()
    trees = args.src or [Path(__file__).resolve().parents[1] / "src"]
    print("| command | " + " | ".join(f"{t}: wall / CPU" for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    with tempfile.TemporaryDirectory() as cwd:
        for label, case in CASES.items():
            if args.only not in label:
                continue
            cells = []
            for tree in trees:
                runs = [seconds(case, tree, Path(cwd)) for _ in range(args.repeat)]
                cells.append(f"{min(w for w, _ in runs):.2f} s / {min(c for _, c in runs):.2f} s")
            print(f"| `{label}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
