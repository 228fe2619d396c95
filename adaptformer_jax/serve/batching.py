"""Dynamic batching: requests that arrive within a few milliseconds share one program run.

Requests queue on the server's event loop; one task takes the first, waits up to
`max_wait_s` for more (of any adapter) until `max_batch` images are gathered, pads the
batch to the next compiled size and runs it in one worker thread. While a batch runs,
the next one gathers, so under load batches fill without waiting.
"""
import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable

import numpy as np


def batch_sizes(max_batch: int) -> list[int]:
  """The compiled sizes: powers of two below `max_batch`, and `max_batch`; a batch is
  padded to the smallest that holds it (at most 2x the work, few programs)."""
  return sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch}
                | {max_batch})


@dataclasses.dataclass
class _Request:
  images: np.ndarray   # (n, H, W, 3) float32, preprocessed
  slot: int
  done: asyncio.Future


class Batcher:
  """Collects (images, slot) requests into batches for `classify(images, slots) -> probs`."""

  def __init__(self, classify: Callable[[np.ndarray, np.ndarray], np.ndarray],
               max_batch: int, max_wait_s: float):
    self.classify, self.max_batch, self.max_wait_s = classify, max_batch, max_wait_s
    self.sizes = batch_sizes(max_batch)
    self.batches = 0  # batches run, and the images in them (mean formed batch = ratio)
    self.images = 0
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='batcher')

  def start(self) -> None:
    """Starts the batching task on the running event loop."""
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def stop(self) -> None:
    """Stops after the batch in flight (the server lets requests finish first)."""
    if self._task:
      self._task.cancel()
      await asyncio.gather(self._task, return_exceptions=True)
    self._worker.shutdown(wait=True)

  async def submit(self, images: np.ndarray, slot: int) -> np.ndarray:
    """(n, classes) probabilities of `images` (n <= max_batch) through adapter `slot`."""
    done = asyncio.get_running_loop().create_future()
    await self._queue.put(_Request(images, slot, done))
    return await done

  async def _run(self) -> None:
    carry = None
    loop = asyncio.get_running_loop()
    while True:
      batch = [carry or await self._queue.get()]
      carry = None
      count = len(batch[0].images)
      deadline = loop.time() + self.max_wait_s
      while count < self.max_batch:
        try:
          request = await asyncio.wait_for(self._queue.get(), max(0, deadline - loop.time()))
        except asyncio.TimeoutError:
          break
        if count + len(request.images) > self.max_batch:
          carry = request
          break
        batch.append(request)
        count += len(request.images)
      try:
        probabilities = await loop.run_in_executor(self._worker, self._classify, batch)
      except Exception as e:  # pylint: disable=broad-except  # fail the batch, keep serving
        for request in batch:
          if not request.done.done():
            request.done.set_exception(e)
        continue
      start = 0
      for request in batch:
        n = len(request.images)
        if not request.done.done():  # a client that went away cancelled its future
          request.done.set_result(probabilities[start:start + n])
        start += n

  def _classify(self, batch: list[_Request]) -> np.ndarray:
    """One program run over the batch, padded to the next compiled size."""
    count = sum(len(r.images) for r in batch)
    size = next(s for s in self.sizes if s >= count)
    images = np.zeros((size, *batch[0].images.shape[1:]), np.float32)
    images[:count] = np.concatenate([r.images for r in batch])
    # Padding rows join the last request's slot: they add no slot group (serve/grouped.py).
    slots = np.full((size,), batch[-1].slot, np.int32)
    slots[:count] = np.concatenate([np.full(len(r.images), r.slot) for r in batch])
    self.batches += 1
    self.images += count
    return self.classify(images, slots)[:count]
