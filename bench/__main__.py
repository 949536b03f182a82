"""Run one benchmark: `python -m bench NAME` (see `python -m bench --list`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def _names() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")
    )


def main(argv: list[str]) -> int:
    names = _names()
    if len(argv) != 1 or argv[0] in {"-h", "--help", "--list"}:
        print("usage: python -m bench NAME\nbenchmarks: " + ", ".join(names))
        return 0 if argv and argv[0] in {"-h", "--help", "--list"} else 2
    if argv[0] not in names:
        print(f"no benchmark named {argv[0]!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{argv[0]}")
    return int(module.main() or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
