"""Peak memory of a command and every process it starts: `python -m experiments.peak_rss [--out F.json] -- CMD ...`.

`/usr/bin/time -v` reports the largest single process; a prepare with worker processes needs the sum over the
process tree at its peak, so this samples /proc every --interval seconds (RSS of the command and all its
descendants, summed) and prints {"peak_tree_rss_mb", "peak_single_rss_mb", "wall_s", "returncode", "command"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _children() -> dict[int, list[int]]:
  out: dict[int, list[int]] = {}
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat', encoding='ascii', errors='replace') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    out.setdefault(ppid, []).append(int(name))
  return out


def _rss_kb(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status', encoding='ascii', errors='replace') as f:
      return next((int(line.split()[1]) for line in f if line.startswith('VmRSS:')), 0)
  except OSError:
    return 0


def tree_rss_kb(root: int) -> tuple[int, int]:
  """(summed RSS, largest single RSS) in KiB of `root` and all its descendants, now."""
  kids, stack, total, largest = _children(), [root], 0, 0
  while stack:
    pid = stack.pop()
    rss = _rss_kb(pid)
    total, largest = total + rss, max(largest, rss)
    stack += kids.get(pid, [])
  return total, largest


def measure(command: list[str], interval: float = 0.2) -> dict:
  t0 = time.time()
  proc = subprocess.Popen(command)
  peak_total = peak_single = 0
  while proc.poll() is None:
    total, single = tree_rss_kb(proc.pid)
    peak_total, peak_single = max(peak_total, total), max(peak_single, single)
    time.sleep(interval)
  return dict(
    command=command,
    returncode=proc.returncode,
    wall_s=round(time.time() - t0, 1),
    peak_tree_rss_mb=round(peak_total / 1024, 1),
    peak_single_rss_mb=round(peak_single / 1024, 1),
    interval_s=interval,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', default='', help='also write the result as JSON here')
  p.add_argument('--interval', type=float, default=0.2)
  p.add_argument('command', nargs=argparse.REMAINDER)
  a = p.parse_args(argv)
  command = a.command[1:] if a.command[:1] == ['--'] else a.command
  if not command:
    p.error('give the command after --')
  result = measure(command, a.interval)
  print(json.dumps(result))
  if a.out:
    with open(a.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  return result['returncode']


if __name__ == '__main__':
  sys.exit(main())
