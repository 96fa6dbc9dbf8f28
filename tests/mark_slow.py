"""Writes ``tests/slow_tests.txt`` from a pytest durations report: every test whose slowest
phase (setup, call or teardown) took at least ``--seconds``, so that ``python -m pytest -q -n 2
-m "not slow" tests`` is the fast tier.

  python -m pytest -q -n 2 --durations=0 --durations-min=0.5 tests > /tmp/durations.txt
  python tests/mark_slow.py /tmp/durations.txt --seconds=4
"""
import argparse
import collections
import os
import re

LINE = re.compile(r"^\s*([0-9.]+)s\s+(setup|call|teardown)\s+(\S+)")


def parse(path: str) -> dict:
  """``{test id without parameters: total seconds over its phases and parameter cases}``."""
  total = collections.defaultdict(float)
  with open(path, encoding="utf-8") as f:
    for line in f:
      m = LINE.match(line)
      if m:
        total[m.group(3).split("[", 1)[0]] += float(m.group(1))
  return dict(total)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("durations", help="the output of pytest --durations=0")
  parser.add_argument("--seconds", type=float, default=4.0, help="a test at or above this total is slow")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt"))
  args = parser.parse_args()
  times = parse(args.durations)
  if not times:
    raise SystemExit(f"{args.durations}: no duration lines; run pytest with --durations=0 --durations-min=0.5")
  slow = sorted((t, s) for t, s in times.items() if s >= args.seconds)
  with open(args.out + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"# Tests left out of the fast tier (-m 'not slow'): {args.seconds:g} s or more on 2 CPU cores.\n"
            "# Regenerate: see tests/mark_slow.py.\n")
    for test, seconds in slow:
      f.write(f"{test}  # {seconds:.0f} s\n")
  os.replace(args.out + ".tmp", args.out)
  print(f"{len(slow)} of {len(times)} timed tests marked slow ({sum(s for _, s in slow):.0f} s of "
        f"{sum(times.values()):.0f} s) in {args.out}")


if __name__ == "__main__":
  main()
