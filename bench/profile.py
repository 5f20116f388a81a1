"""Summarise py-spy's collapsed stacks (``python -m bench --profile DIR``): where the relay's time goes.

``python -m bench.profile DIR/scenario-a.txt [--top 25]`` prints the share of samples per function
(self time: the innermost frame) and per function anywhere on the stack (total time)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def summarise(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f.split(" (", 1)[0] + " (" + f.split(" (", 1)[1].split(":", 1)[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            anywhere[f] += n
    lines = [f"{path.name}: {total} samples", "self time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("total time (the function and what it calls):")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in anywhere.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    top = 25
    if "--top" in args:
        i = args.index("--top")
        top = int(args[i + 1])
        del args[i:i + 2]
    for arg in args:
        print(summarise(Path(arg), top))
