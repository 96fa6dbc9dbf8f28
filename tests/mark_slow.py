"""Writes ``tests/slow_tests.txt``: every test whose time reached ``--seconds``, so that
``python -m pytest -q -n 2 -m "not slow" tests`` is the fast tier.

Two kinds of report are read (several files may be given; a test is slow when any of them says so):

- the CPU log the test run writes with ``DIMO_TEST_CPU_LOG`` set (``tests/conftest.py``): the CPU
  seconds of each test, threads and waited-for subprocesses included; a loaded host barely changes
  them, so this is the report to use on a shared machine:

    DIMO_TEST_CPU_LOG=/tmp/cpu.txt python -m pytest -q -n 2 tests
    python tests/mark_slow.py /tmp/cpu.txt --seconds=2

- pytest's durations report (wall seconds per phase, which a loaded host inflates):

    python -m pytest -q -n 2 --durations=0 --durations-min=0.5 tests > /tmp/durations.txt
    python tests/mark_slow.py /tmp/durations.txt --seconds=4

``--keep`` also keeps every test id of the current list (for a report of the fast tier only).
"""
import argparse
import collections
import os
import re

DURATION = re.compile(r"^\s*([0-9.]+)s\s+(setup|call|teardown)\s+(\S+)")
CPU_LOG = re.compile(r"^([0-9.]+) ([0-9.]+) (\S+)")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse(path: str) -> dict:
  """``{test id without parameters: seconds}`` summed over its phases and parameter cases: the CPU
  seconds of a CPU log, the wall seconds of a durations report."""
  total = collections.defaultdict(float)
  with open(path, encoding="utf-8") as f:
    for line in f:
      m = CPU_LOG.match(line) or DURATION.match(line)
      if m:
        total[m.group(3).split("[", 1)[0]] += float(m.group(1))
  return dict(total)


def current(path: str) -> dict:
  """``{test id or file: its comment}`` of an existing slow list."""
  out = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        test, _, note = line.partition("#")
        if test.strip():
          out[test.strip()] = note.strip()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("reports", nargs="+", help="CPU logs (DIMO_TEST_CPU_LOG) or pytest --durations=0 outputs")
  parser.add_argument("--seconds", type=float, default=4.0, help="a test at or above this total is slow")
  parser.add_argument("--keep", action="store_true", help="keep the tests the current list marks slow")
  parser.add_argument("--out", default=os.path.join(HERE, "slow_tests.txt"))
  args = parser.parse_args()
  slow = current(args.out) if args.keep else {}
  timed = 0
  for report in args.reports:
    times = parse(report)
    if not times:
      raise SystemExit(f"{report}: no timing lines; write a CPU log (DIMO_TEST_CPU_LOG) or run pytest with "
                       "--durations=0 --durations-min=0.5")
    timed += len(times)
    kind = "CPU s" if any(CPU_LOG.match(line) for line in open(report, encoding="utf-8")) else "s wall"
    for test, seconds in times.items():
      if seconds >= args.seconds:
        slow[test] = f"{seconds:.0f} {kind}"
  with open(args.out + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"# Tests left out of the fast tier (-m 'not slow'): {args.seconds:g} s or more on 2 CPU cores\n"
            "# (CPU seconds from a CPU log, or wall seconds from a durations report).\n"
            "# Regenerate: see tests/mark_slow.py.\n")
    for test in sorted(slow):
      f.write(f"{test}  # {slow[test]}\n" if slow[test] else f"{test}\n")
  os.replace(args.out + ".tmp", args.out)
  print(f"{len(slow)} tests marked slow of {timed} timed in {args.out}")


if __name__ == "__main__":
  main()
