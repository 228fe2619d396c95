"""A bounded load test of `python -m adaptformer_jax.serve` on 127.0.0.1.

Starts the server on a tiny ViT with synthetic exports of four methods (adaptformer,
lora, vpt_deep, linear; different class counts), takes each (adapter, image) answer
alone as the reference, then runs rounds of `--clients` concurrent clients x
`--requests` requests each over the adapters, with a bad request (unknown adapter,
empty file, text file) every `--bad_every`. Every answer is checked against the
reference (same top-k labels, probabilities within 1e-5) and every bad request must
be its 4xx; it reports lost / mismatched answers, the mean formed batch, p50/p99
latency, img/s and the server's resident memory after each round (it must not grow).

  python benchmarks/serve_load.py [--clients 8] [--requests 200] [--rounds 3]
"""
import argparse
import concurrent.futures
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, tuning, classes, model overrides) of the served exports.
ADAPTERS = (('digits_af', 'adaptformer', 10, {'head': 'bn_linear'}),
            ('shapes_lora', 'lora', 4, {'lora': {'rank': 4, 'alpha': 8.0}}),
            ('colors_vpt', 'vpt_deep', 7, {'vpt': {'num_tokens': 3}}),
            ('probe', 'linear', 6, {}))
BAD = ((b'', 'empty.png', 422), (b'not an image', 'notes.png', 422), (None, 'x.png', 404))


def post(port: int, adapter: str | None, files: list[tuple[str, bytes]], top_k: int = 5,
         timeout: float = 120) -> tuple[int, dict]:
  """(status, JSON body) of POST /v1/predict with a multipart form."""
  boundary = uuid.uuid4().hex
  body = io.BytesIO()
  fields = [('top_k', None, str(top_k).encode())]
  if adapter is not None:
    fields.append(('adapter', None, adapter.encode()))
  fields += [('image', name, content) for name, content in files]
  for field, filename, content in fields:
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"'.encode())
    if filename is not None:
      body.write(f'; filename="{filename}"\r\nContent-Type: application/octet-stream'.encode())
    body.write(b'\r\n\r\n' + content + b'\r\n')
  body.write(f'--{boundary}--\r\n'.encode())
  connection = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
  try:
    connection.request('POST', '/v1/predict', body.getvalue(),
                       {'Content-Type': f'multipart/form-data; boundary={boundary}'})
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def get(port: int, path: str) -> tuple[int, dict]:
  connection = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
  try:
    connection.request('GET', path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def write_setup(root: str) -> tuple[str, dict[str, str], list[bytes]]:
  """(config file, {name: export dir}, PNG images) of the tiny served model, under `root`."""
  sys.path[:0] = [os.path.join(ROOT, 'tests'), os.path.join(ROOT, 'benchmarks')]
  from conftest import tiny_run_config  # pylint: disable=g-import-not-at-top
  import serve_exports  # pylint: disable=g-import-not-at-top
  config = tiny_run_config()
  dirs = {name: serve_exports.write_export(os.path.join(root, name), config, tuning, classes,
                                           seed, **model)
          for seed, (name, tuning, classes, model) in enumerate(ADAPTERS)}
  path = os.path.join(root, 'config.py')
  with open(path, 'w') as f:
    f.write(f'import sys\nsys.path.insert(0, {os.path.join(ROOT, "tests")!r})\n'
            'from conftest import tiny_run_config\n\n\ndef get_config(arg=None):\n'
            '  return tiny_run_config()\n')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = []
  for i in range(8):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12 + 3 * i, 20, 3), np.uint8)).save(out, 'PNG')
    images.append(out.getvalue())
  return path, dirs, images


def start_server(config: str, dirs: dict[str, str], port: int, *extra: str,
                 timeout: float = 300) -> subprocess.Popen:
  """The server process, once /healthz answers 200 (its program compiled)."""
  args = [sys.executable, '-m', 'adaptformer_jax.serve', f'--config={config}',
          f'--port={port}', *[f'--adapters={n}={d}' for n, d in dirs.items()], *extra]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'the server exited with {proc.returncode}:\n{proc.stdout.read()}')
    try:
      if get(port, '/healthz')[0] == 200:
        return proc
    except OSError:
      pass
    time.sleep(0.2)
  proc.kill()
  raise RuntimeError('the server did not become healthy in time')


def rss_mb(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def references(port: int, names: list[str], images: list[bytes]) -> dict:
  """{(adapter, image index): predictions} of every image sent alone, all classes."""
  return {(n, i): post(port, n, [(f'{i}.png', im)], top_k=100)[1]['predictions'][0]
          for n in names for i, im in enumerate(images)}


def matches(got: list[dict], want: list[dict]) -> bool:
  """Same labels in the same order (up to near-ties) and probabilities within 1e-5."""
  wanted = {p['label']: p['prob'] for p in want}
  return all(p['label'] in wanted and abs(p['prob'] - wanted[p['label']]) <= 1e-5 for p in got)


def run_load(port: int, names: list[str], images: list[bytes], expected: dict, clients: int,
             per_client: int, bad_every: int, seed: int = 0) -> dict:
  """Runs `clients` x `per_client` requests; counts of ok / bad / wrong answers, latencies."""

  def client(c):
    rng = np.random.default_rng(seed * 1000 + c)
    out = []
    for r in range(per_client):
      if bad_every and (r + c) % bad_every == bad_every - 1:
        content, filename, status = BAD[r % len(BAD)]
        name = None if content is None else names[r % len(names)]
        files = [(filename, content if content is not None else images[0])]
        got, _ = post(port, name or 'no_such_adapter', files)
        out.append(('bad', got == status, 0.0, 0))
        continue
      name = names[rng.integers(len(names))]
      chosen = rng.choice(len(images), size=int(rng.integers(1, 3)), replace=False)
      start = time.perf_counter()
      status, body = post(port, name, [(f'{i}.png', images[i]) for i in chosen], top_k=3)
      latency = time.perf_counter() - start
      good = (status == 200 and body['adapter'] == name and len(body['predictions']) == len(chosen)
              and all(matches(p, expected[name, i]) for p, i in zip(body['predictions'], chosen)))
      out.append(('ok', good, latency, len(chosen)))
    return out

  _, before = get(port, '/v1/stats')
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [r for rs in pool.map(client, range(clients)) for r in rs]
  elapsed = time.perf_counter() - start
  _, after = get(port, '/v1/stats')
  latencies = np.array([r[2] for r in results if r[0] == 'ok'])
  batches = after['batches'] - before['batches']
  return {'requests': len(results), 'answered': sum(r[1] for r in results if r[0] == 'ok'),
          'wrong': sum(not r[1] for r in results if r[0] == 'ok'),
          'bad_refused': sum(r[1] for r in results if r[0] == 'bad'),
          'bad_sent': sum(r[0] == 'bad' for r in results),
          'mean_batch': (after['images'] - before['images']) / max(batches, 1),
          'p50_ms': 1000 * float(np.percentile(latencies, 50)),
          'p99_ms': 1000 * float(np.percentile(latencies, 99)),
          'img_per_s': sum(r[3] for r in results) / elapsed}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--clients', type=int, default=8)
  parser.add_argument('--requests', type=int, default=200, help='per client and round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--bad_every', type=int, default=10)
  parser.add_argument('--max_wait_ms', type=float, default=5.0)
  args = parser.parse_args()
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import machine  # pylint: disable=g-import-not-at-top
  print(machine.describe())
  with tempfile.TemporaryDirectory() as root:
    config, dirs, images = write_setup(root)
    port = free_port()
    proc = start_server(config, dirs, port, '--max_batch=16', '--max_images=4',
                        f'--max_wait_ms={args.max_wait_ms}')
    try:
      expected = references(port, list(dirs), images)
      print(f'server up, {len(dirs)} adapters; RSS {rss_mb(proc.pid):.0f} MB; load '
            f'{os.getloadavg()[0]:.2f}')
      for r in range(args.rounds):
        stats = run_load(port, list(dirs), images, expected, args.clients, args.requests,
                         args.bad_every, seed=r)
        print(f'round {r}: ' + ', '.join(f'{k} {v:.1f}' if isinstance(v, float) else f'{k} {v}'
                                         for k, v in stats.items())
              + f'; RSS {rss_mb(proc.pid):.0f} MB; load {os.getloadavg()[0]:.2f}', flush=True)
    finally:
      proc.send_signal(signal.SIGTERM)
      print(f'SIGTERM: exit status {proc.wait(60)}')


if __name__ == '__main__':
  main()
