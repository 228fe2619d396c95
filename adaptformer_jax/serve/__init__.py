"""Many tasks, one backbone: adapter exports classified in mixed batches, and a server.

`multi.MultiAdapter` holds one frozen backbone and any number of adapter exports and
classifies a batch in which each image names its adapter, in one compiled program
(`stack` builds the union model and the stacked adapter leaves); `app` is the HTTP
API and page over it, with dynamic batching (`batching`) and checked image decoding
(`images`); `python -m adaptformer_jax.serve` runs it. See docs/serving.md.
"""
