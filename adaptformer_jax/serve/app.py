"""The HTTP API and the page, as a FastAPI app over one `MultiAdapter` and a `Batcher`.

Every refusal is a 4xx with `{"error": "..."}` naming the problem: 400 a missing or
malformed field or too many images, 404 an unknown adapter, 413 a request body over
the size limit (refused from its Content-Length before any of it is read, or as soon
as a chunked body passes the limit) or an image over the pixel limit, 422 a file that
is not a decodable image. An unexpected failure is a 500 with one line, no traceback,
and the server keeps serving. The program compiles in the background after start-up:
until it is ready /healthz and /v1/predict answer 503.
"""
import asyncio
import contextlib
from collections.abc import Callable
import dataclasses
import importlib.resources
import logging
import time

import fastapi
from fastapi import responses
import numpy as np
import starlette.datastructures
import starlette.exceptions
from starlette.concurrency import run_in_threadpool

from adaptformer_jax.serve import batching
from adaptformer_jax.serve import images as images_lib
from adaptformer_jax.serve import multi

log = logging.getLogger('adaptformer_jax.serve')


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may hold."""
  max_body_bytes: int = 32 << 20
  max_pixels: int = 40_000_000
  max_images: int = 16   # per request; at most the max batch
  max_top_k: int = 100


class _BodyTooLarge(Exception):
  pass


def error(status: int, message: str) -> responses.JSONResponse:
  """The one shape of every refusal: {"error": message}."""
  return responses.JSONResponse({'error': message}, status_code=status)


class BodyLimit:
  """ASGI middleware: a body over `limit` bytes gets 413 before it is read whole."""

  def __init__(self, app: Callable, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    declared = dict(scope['headers']).get(b'content-length')
    if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
      response = error(413, f'the request body ({declared.decode(errors="replace")} bytes) is '
                       f'over the limit of {self.limit:,} bytes; send fewer or smaller images.')
      return await response(scope, receive, send)
    seen = 0

    async def counted():
      nonlocal seen
      message = await receive()
      seen += len(message.get('body', b''))
      if seen > self.limit:
        raise _BodyTooLarge()
      return message

    return await self.app(scope, counted, send)


def create(model: multi.MultiAdapter, preprocess: Callable[[np.ndarray], np.ndarray],
           limits: Limits, max_batch: int, max_wait_s: float) -> fastapi.FastAPI:
  """The app; `preprocess(uint8 (H, W, 3)) -> float32 model input`."""
  batcher = batching.Batcher(model.probabilities, max_batch, max_wait_s)
  ready = asyncio.Event()

  async def compile_all():
    await run_in_threadpool(preprocess, np.zeros((8, 8, 3), np.uint8))  # traces its graph
    for size in batcher.sizes:
      await run_in_threadpool(model.compile, size)
    ready.set()
    log.info('ready: compiled batch sizes %s', batcher.sizes)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    batcher.start()
    compiling = asyncio.get_running_loop().create_task(compile_all())
    yield
    compiling.cancel()
    await batcher.stop()

  app = fastapi.FastAPI(title='adaptformer_jax serve', lifespan=lifespan, docs_url=None,
                        redoc_url=None, openapi_url=None)

  @app.exception_handler(_BodyTooLarge)
  async def _too_large(request, exc):
    del request, exc
    return error(413, f'the request body is over the limit of {limits.max_body_bytes:,} '
                 'bytes; send fewer or smaller images.')

  @app.exception_handler(starlette.exceptions.HTTPException)
  async def _http(request, exc):
    del request
    return error(exc.status_code, str(exc.detail))

  @app.exception_handler(Exception)
  async def _unexpected(request, exc):
    log.exception('unexpected error on %s', request.url.path)
    return error(500, f'internal error ({type(exc).__name__}); the server logged it.')

  @app.get('/', response_class=responses.HTMLResponse)
  async def page():
    return importlib.resources.files('adaptformer_jax.serve').joinpath('page.html').read_text()

  @app.get('/healthz')
  async def healthz():
    if not ready.is_set():
      return error(503, 'compiling the program; retry shortly.')
    return {'status': 'ok', 'batch_sizes': batcher.sizes}

  @app.get('/v1/adapters')
  async def adapters():
    return {'adapters': model.describe()}

  @app.get('/v1/stats')
  async def stats():
    return {'batches': batcher.batches, 'images': batcher.images,
            'mean_batch': batcher.images / max(batcher.batches, 1)}

  @app.post('/v1/predict')
  async def predict(request: fastapi.Request):
    if not ready.is_set():
      return error(503, 'compiling the program; retry shortly.')
    async with request.form(max_files=limits.max_images + 1,
                            max_fields=limits.max_images + 8) as form:  # closes spooled files
      return await classify(form)

  async def classify(form: starlette.datastructures.FormData):
    name = form.get('adapter')
    if not isinstance(name, str) or not name:
      return error(400, "missing form field 'adapter' (the name of an adapter; GET "
                   '/v1/adapters lists them).')
    if name not in model.slots:
      return error(404, f'unknown adapter {name!r}; this server has: '
                   f'{", ".join(model.slots)}.')
    files = form.getlist('image')
    if not files:
      return error(400, "missing form field 'image' (one or more image files).")
    if not all(isinstance(f, starlette.datastructures.UploadFile) for f in files):
      return error(400, "form field 'image' must be a file upload, not text.")
    if len(files) > limits.max_images:
      return error(400, f'too many images: {len(files)}; at most {limits.max_images} per '
                   'request.')
    top_k = form.get('top_k', '5')
    if not (isinstance(top_k, str) and top_k.isdigit() and 1 <= int(top_k) <= limits.max_top_k):
      return error(400, f'top_k must be an integer from 1 to {limits.max_top_k}; got {top_k!r}.')
    start = time.perf_counter()
    try:
      pixels = [await run_in_threadpool(_model_input, await f.read(), f.filename or f'#{i}',
                                        limits.max_pixels, preprocess)
                for i, f in enumerate(files)]
    except images_lib.BadImage as e:
      return error(e.status, str(e))
    probabilities = await batcher.submit(np.stack(pixels), model.slots[name])
    names = model.exports[model.slots[name]].class_names
    k = min(int(top_k), len(names))
    predictions = [[{'label': names[c], 'prob': float(row[c])}
                    for c in np.argsort(-row[:len(names)], kind='stable')[:k]]
                   for row in probabilities]
    return {'adapter': name, 'predictions': predictions,
            'latency_ms': round(1000 * (time.perf_counter() - start), 2)}

  return app


def _model_input(content: bytes, name: str, max_pixels: int,
                 preprocess: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  return preprocess(images_lib.decode(content, name, max_pixels))
