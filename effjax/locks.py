"""The workdir lock on an object store, where flock means nothing.

`gs://B/run/.lock` is created with the precondition ifGenerationMatch=0 ("only if no such object exists"), which
the store grants to exactly one of any number of racing creators. While a run holds it, a thread rewrites it
every REFRESH_S seconds (conditional on its own generation), so the object's update time says whether its holder
is alive. A second run finds it and:
- refuses in one line if the holder refreshed it recently (a live run elsewhere);
- takes it over at once if the holder is a process of this host that no longer exists (a killed run, resumed);
- waits, checking every POLL_S seconds, while the holder has missed heartbeats, and takes it over once it has
  not been refreshed for STALE_S seconds (a preempted VM: its run is gone and cannot say so). STALE_S defaults
  to 300 and can be set with EFFJAX_LOCK_STALE_S.
A takeover deletes the stale object conditional on its generation and creates a new one with ifGenerationMatch=0,
so two runs taking over the same stale lock cannot both win. The lock is deleted when the run ends (a refused
run, which never created it, changes nothing).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from absl import logging

from effjax.errors import EffjaxError

REFRESH_S = 60.0
POLL_S = 10.0


def stale_seconds() -> float:
  return float(os.environ.get('EFFJAX_LOCK_STALE_S', '300'))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class ObjectLock:
  """An exclusive lock held as one object; `acquire()` raises EffjaxError when another live run holds it."""

  def __init__(self, url: str, what: str, hint: str = 'wait for it to finish or use another workdir'):
    from google.cloud import storage  # pylint: disable=import-outside-toplevel  (the [gcs] extra; checked first)

    bucket, _, name = url.split('://', 1)[1].partition('/')
    self.url, self.what, self.hint = url, what, hint
    self._blob = storage.Client().bucket(bucket).blob(name)
    self._generation = None
    self._stop = threading.Event()
    self._thread = None

  def _payload(self) -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()})

  def _create(self) -> bool:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    try:
      self._blob.upload_from_string(self._payload(), if_generation_match=0)
    except exceptions.PreconditionFailed:
      return False
    self._generation = self._blob.generation
    return True

  def _holder(self):
    """(generation, seconds since its last refresh, holder dict) of the existing lock; None if it is gone."""
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    from google.cloud import storage  # pylint: disable=import-outside-toplevel

    blob = storage.Blob(self._blob.name, self._blob.bucket)
    try:
      blob.reload()
      text = blob.download_as_text(if_generation_match=blob.generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return None
    try:
      holder = json.loads(text)
    except ValueError:
      holder = {}
    age = max(0.0, time.time() - blob.updated.timestamp())
    return blob.generation, age, holder if isinstance(holder, dict) else {}

  def _take_over(self, generation) -> bool:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    try:
      self._blob.delete(if_generation_match=generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      pass  # already gone, or taken over by someone else: the create decides
    return self._create()

  def acquire(self) -> 'ObjectLock':
    stale, waited = stale_seconds(), False
    while not self._create():
      found = self._holder()
      if found is None:
        continue  # released between our create and the read: try again
      generation, age, holder = found
      who = f'host {holder.get("host", "?")} pid {holder.get("pid", "?")}'
      same_host_dead = (
        holder.get('host') == socket.gethostname()
        and isinstance(holder.get('pid'), int)
        and not _pid_alive(holder['pid'])
      )
      if same_host_dead or age >= stale:
        why = 'its process is gone' if same_host_dead else f'not refreshed for {age:.0f} s'
        if self._take_over(generation):
          logging.warning('took over the stale lock %s (%s, %s)', self.url, who, why)
          break
        continue
      if age <= 2 * REFRESH_S:
        raise EffjaxError(
          f'{self.what} is in use by another effjax run ({who}, lock {self.url} refreshed {age:.0f} s ago); {self.hint}'
        )
      if not waited:
        logging.warning(
          'the lock %s of %s was last refreshed %.0f s ago; waiting until it is %.0f s old '
          '(then its run is taken to be gone)',
          self.url,
          who,
          age,
          stale,
        )
        waited = True
      time.sleep(POLL_S)
    self._thread = threading.Thread(target=self._refresh, name='effjax-lock-refresh', daemon=True)
    self._thread.start()
    return self

  def _refresh(self) -> None:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    while not self._stop.wait(REFRESH_S):
      try:
        self._blob.upload_from_string(self._payload(), if_generation_match=self._generation)
        self._generation = self._blob.generation
      except exceptions.PreconditionFailed:
        logging.error('the lock %s was taken over by another run; two runs may now write this workdir', self.url)
        return
      except Exception as e:  # pylint: disable=broad-except  (a network hiccup: the next refresh retries)
        logging.warning('could not refresh the lock %s (%s)', self.url, e)

  def release(self) -> None:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
    if self._generation is not None:
      try:
        self._blob.delete(if_generation_match=self._generation)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        pass
      self._generation = None
