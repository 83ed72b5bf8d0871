"""mypy ratchet: the error count of `mypy` (config in pyproject.toml) may only go down.

The committed number in tools/mypy-baseline.txt is the most errors `make lint` accepts. More errors fail with
the list; fewer fail too, asking to lower the number (`--update`), so that a fixed error cannot come back
unnoticed. `--update` only ever lowers it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tools" / "mypy-baseline.txt"
ERROR = re.compile(r"^(?P<file>[^:\s]+\.py):\d+(?::\d+)?: error: ")


def read_baseline() -> int:
    """The first non-comment line of the baseline file, an integer."""
    for line in BASELINE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return int(line)
    raise SystemExit(f"{BASELINE.relative_to(ROOT)} holds no number")


def write_baseline(count: int) -> None:
    BASELINE.write_text(
        f"# Most mypy errors `make lint` accepts (tools/mypy_ratchet.py). Only ever lower it.\n{count}\n"
    )


def run_mypy() -> tuple[list[str], str]:
    """mypy's error lines and its whole output; a crash or a config error (exit 2) stops here."""
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode not in (0, 1):
        raise SystemExit(f"mypy failed to run (exit {out.returncode}):\n{text}")
    return [line for line in text.splitlines() if ERROR.match(line)], text


def main(argv: list[str]) -> int:
    errors, _ = run_mypy()
    count, baseline = len(errors), read_baseline()
    by_file = Counter(line.split(":", 1)[0] for line in errors)
    breakdown = ", ".join(f"{f} {n}" for f, n in sorted(by_file.items(), key=lambda kv: (-kv[1], kv[0])))
    if "--update" in argv:
        if count > baseline:
            print(f"mypy: {count} errors > baseline {baseline}; the baseline only goes down. Fix the new ones.")
            return 1
        write_baseline(count)
        print(f"mypy: baseline {baseline} -> {count}")
        return 0
    if count > baseline:
        print("\n".join(errors))
        print(f"mypy: {count} errors, more than the baseline {baseline}: fix the new ones above ({breakdown}).")
        return 1
    if count < baseline:
        print(
            f"mypy: {count} errors, fewer than the baseline {baseline}: well done; lower it with "
            f"`.venv/bin/python tools/mypy_ratchet.py --update` and commit tools/mypy-baseline.txt."
        )
        return 1
    print(f"mypy: {count} errors = baseline{f' ({breakdown})' if breakdown else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
