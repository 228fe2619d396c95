"""`python -m adaptformer_jax.serve --config CONFIG --adapters NAME=DIR [...] --port 8000`.

CONFIG is read as `--mode predict --adapters` reads it: the backbone (preset,
`init_from` or seed, image size) and the preprocessing; each adapter's method,
options and classes come from its export. SIGTERM (or Ctrl-C) stops accepting
connections, lets the requests in flight finish and exits with status 0.
"""
import signal

from absl import flags
from ml_collections import config_flags

from adaptformer_jax import cli
from adaptformer_jax.errors import UserError

CONFIG = config_flags.DEFINE_config_file('config', None, 'The backbone and preprocessing, '
                                         'as for --mode predict --adapters.')
ADAPTERS = flags.DEFINE_multi_string('adapters', [], 'NAME=DIR of an adapter export; repeat '
                                     'for more.')
HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: all).')
PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.')
MAX_BATCH = flags.DEFINE_integer('max_batch', 32, 'Most images classified in one program run.')
MAX_WAIT_MS = flags.DEFINE_float('max_wait_ms', 5.0, 'How long a batch waits for more requests.')
MAX_IMAGES = flags.DEFINE_integer('max_images', 0, 'Most images in one request (0: --max_batch).')
MAX_BODY_MB = flags.DEFINE_float('max_body_mb', 32.0, 'Largest request body (MiB).')
MAX_PIXELS = flags.DEFINE_integer('max_pixels', 40_000_000, 'Largest image (width x height).')


def serve() -> None:
  """Loads the model, then serves until SIGTERM/SIGINT."""
  # pylint: disable=g-import-not-at-top  # JAX, TF and the web stack load once flags are good
  import uvicorn
  from adaptformer_jax import runtime
  from adaptformer_jax import schema
  from adaptformer_jax.serve import app as app_lib
  from adaptformer_jax.serve import images
  from adaptformer_jax.serve import multi
  config = cli.loaded_config(CONFIG)
  if config is None:
    raise UserError('--config is required: the backbone the adapters were trained on, e.g. '
                    'configs/folder.py.')
  max_images = MAX_IMAGES.value or MAX_BATCH.value
  if MAX_BATCH.value < 1 or not 1 <= max_images <= MAX_BATCH.value:
    raise UserError(f'--max_images={MAX_IMAGES.value} must be from 1 to --max_batch '
                    f'({MAX_BATCH.value}): a request is classified in one batch.')
  adapters = multi.parse_adapters(ADAPTERS.value)
  config = runtime.with_num_classes(config, max(config.model.num_classes, 1), '')
  schema.validate(config)
  model = multi.MultiAdapter(config, adapters)
  limits = app_lib.Limits(max_body_bytes=int(MAX_BODY_MB.value * (1 << 20)),
                          max_pixels=MAX_PIXELS.value, max_images=max_images)
  web = app_lib.create(model, images.preprocessor(config.data, config.model.image_size),
                       limits, MAX_BATCH.value, MAX_WAIT_MS.value / 1000)
  for e, described in zip(model.exports, model.describe()):
    print(f'adapter {e.name}: {e.model.tuning}, {len(e.class_names)} classes, '
          f'{described["trainable_params"]:,} parameters ({e.path})', flush=True)
  # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a
  # handler that ignores it lets the process end with status 0.
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: None)
  uvicorn.run(app_lib.BodyLimit(web, limits.max_body_bytes), host=HOST.value, port=PORT.value,
              log_level='warning', timeout_graceful_shutdown=30)
  print('stopped: requests in flight finished.', flush=True)


if __name__ == '__main__':
  cli.run_app(serve)
