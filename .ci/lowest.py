"""Print pip constraints pinning every direct dependency of slimtune (and its extras) to its lower bound.

    python3 .ci/lowest.py > lowest.txt && pip install -c lowest.txt 'torch==2.13.0' -e '.[test]'

A `name>=X` requirement becomes `name==X` (its environment marker kept); a requirement without a lower
bound is left to the resolver. torch is left out: CI machines install the local CPU build (a bare torch
requirement pulls a multi-GB CUDA build), and its lower bound is tested on the GPU machine.
"""

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch", "slimtune"}


def lower_bounds(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = {}
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)", spec)
        name, versions = match.group(1).lower(), match.group(2)
        low = re.search(r">=\s*([0-9][^,\s]*)", versions)
        if name in SKIP or low is None:
            continue
        pins[name] = f"{name}=={low.group(1)}" + (f"; {marker.strip()}" if marker.strip() else "")
    return sorted(pins.values())


if __name__ == "__main__":
    sys.stdout.write("".join(f"{line}\n" for line in lower_bounds(Path(__file__).parent.parent / "pyproject.toml")))
