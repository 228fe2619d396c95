"""serve/batching.py: the compiled sizes, and how a formed batch is padded."""
import asyncio

import numpy as np

from adaptformer_jax.serve import batching


def test_sizes_are_powers_of_two_up_to_the_maximum():
  assert batching.batch_sizes(6) == [1, 2, 4, 6]
  assert batching.batch_sizes(8) == [1, 2, 4, 8]


def test_padding_rows_join_the_last_requests_slot():
  seen = []
  batcher = batching.Batcher(lambda images, slots: seen.append(slots) or images[:, :2, 0, 0],
                             max_batch=8, max_wait_s=0)
  loop = asyncio.new_event_loop()
  requests = [batching._Request(np.full((n, 2, 2, 3), s, np.float32), s, loop.create_future())  # pylint: disable=protected-access
              for n, s in ((2, 5), (3, 1))]
  out = batcher._classify(requests)  # pylint: disable=protected-access
  loop.close()
  np.testing.assert_array_equal(seen[0], [5, 5, 1, 1, 1, 1, 1, 1])  # 5 images padded to 8
  np.testing.assert_array_equal(out[:, 0], [5, 5, 1, 1, 1])
  assert (batcher.batches, batcher.images) == (1, 5)
