"""The ways a run ends, as exceptions and as the process exit codes a scheduler acts on.

0   EXIT_FINISHED    trained to train.steps (or an eval/sample/export/summary that completed)
2   EXIT_USER_ERROR  a mistake in the config, flags, data or workdir: one line on stderr; rerunning as is fails
3   EXIT_DIVERGED    loss, gradients or parameters became non-finite; the last good checkpoint is kept
75  EXIT_PREEMPTED   stopped by SIGTERM/SIGINT after saving a checkpoint: resubmit the same command to resume
                     (75 is EX_TEMPFAIL of sysexits.h, "try again later")
"""

from __future__ import annotations

import errno
import os
import shutil

EXIT_FINISHED = 0
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


class EffjaxError(Exception):
  """A user mistake: main.py prints it as one line and exits with `exit_code`."""

  exit_code = EXIT_USER_ERROR


class DivergedError(EffjaxError):
  """Training produced non-finite values; nothing non-finite was checkpointed."""

  exit_code = EXIT_DIVERGED


class Preempted(Exception):
  """A stop signal ended training at a step boundary, after its checkpoint was saved: rerun to resume."""

  exit_code = EXIT_PREEMPTED


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_no_space(e: BaseException) -> bool:
  """Whether an exception (or one it was raised from) is a full disk, a quota or a file-size limit."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in NO_SPACE:
      return True
    text = str(e)
    if 'No space left on device' in text or 'Disk quota exceeded' in text or 'File too large' in text:
      return True
    e = e.__cause__ or e.__context__
  return False


def no_space_error(path: str, needed: int | None, what: str) -> EffjaxError:
  """One line naming where the write failed, how much it needs and how much is free."""
  try:
    free = f'{shutil.disk_usage(_existing_parent(path)).free:,} bytes free'
  except OSError:
    free = 'free space unknown'
  need = f'about {needed:,} bytes' if needed else 'more space'
  return EffjaxError(
    f'no space left writing {what} to {path} (needs {need}, {free}); the last good checkpoint '
    'is kept: free space (or move the workdir) and rerun to resume'
  )


def _existing_parent(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path
