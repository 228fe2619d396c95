"""The server against real requests: one process of `python -m adaptformer_jax.serve` on a
tiny ViT with adaptformer, lora, vpt_deep and linear exports, shared by this module.

Its answers equal `--mode predict --adapters DIR` for the same files; every bad input
is a 4xx JSON error and the server stays up; a small concurrent load with bad requests
mixed in loses and mixes up nothing, and forms batches; the page works in headless
Chromium; SIGTERM lets a request in flight finish and exits 0 (last test).
"""
import copy
import http.client
import os
import select
import signal
import socket
import sys
import time
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import serve_load  # noqa: E402  pylint: disable=g-import-not-at-top

from adaptformer_jax import jobs  # noqa: E402
from adaptformer_jax.weights import exports  # noqa: E402

LIMITS = ['--max_batch=4', '--max_images=4', '--max_body_mb=0.25', '--max_pixels=250000',
          '--max_wait_ms=20']


class Served:
  """The running server: its process, port, exports and test images."""

  def __init__(self, root):
    self.root = str(root)
    self.config, self.dirs, self.images = serve_load.write_setup(self.root)
    self.port = serve_load.free_port()
    self.proc = serve_load.start_server(self.config, self.dirs, self.port, *LIMITS)

  def post(self, adapter, files, top_k=5):
    return serve_load.post(self.port, adapter, files, top_k)


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  server = Served(tmp_path_factory.mktemp('serve'))
  yield server
  if server.proc.poll() is None:
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(60)


def predicted(served, name, tmp_path):
  """--mode predict --adapters DIR's probabilities of the served images (its own config)."""
  from conftest import tiny_run_config  # pylint: disable=g-import-not-at-top
  paths = []
  for i, content in enumerate(served.images):
    paths.append(str(tmp_path / f'{i}.png'))
    with open(paths[-1], 'wb') as f:
      f.write(content)
  config = copy.deepcopy(tiny_run_config())
  saved = exports.read_adapter_config(served.dirs[name])['model']
  config.model.update({k: saved[k] for k in ('tuning', 'num_classes', 'head')})
  for section in ('adapter', 'lora', 'vpt'):
    config.model[section].update(saved[section])
  out = tmp_path / name
  os.makedirs(out)
  return jobs.predict_files(config, None, paths, out=str(out), adapters=served.dirs[name])[1]


@pytest.mark.parametrize('name', ['digits_af', 'shapes_lora', 'colors_vpt'])
def test_answers_equal_mode_predict_with_the_adapters(served, name, tmp_path):
  want = predicted(served, name, tmp_path)
  files = [(f'{i}.png', im) for i, im in enumerate(served.images[:4])]
  status, body = served.post(name, files, top_k=100)
  assert status == 200, body
  assert body['adapter'] == name and len(body['predictions']) == 4
  names = exports.read_adapter_config(served.dirs[name])['class_names']
  for row, ranked in zip(want, body['predictions']):
    assert len(ranked) == len(names)
    got = np.array([next(p['prob'] for p in ranked if p['label'] == n) for n in names])
    np.testing.assert_allclose(got, row, atol=1e-5, rtol=0)
    assert [p['label'] for p in ranked][0] == names[int(np.argmax(row))]


def test_lists_the_adapters_and_is_healthy(served):
  status, body = serve_load.get(served.port, '/v1/adapters')
  assert status == 200
  listed = {a['name']: a for a in body['adapters']}
  assert list(listed) == list(served.dirs)
  assert listed['colors_vpt']['method'] == 'vpt_deep'
  assert len(listed['shapes_lora']['classes']) == 4
  assert listed['probe']['trainable_params'] < listed['digits_af']['trainable_params']
  assert serve_load.get(served.port, '/healthz')[0] == 200


def bomb_png(side):
  """A valid PNG of side x side black pixels, a few hundred bytes (zlib of zeros)."""
  def chunk(kind, data):
    return (len(data).to_bytes(4, 'big') + kind + data
            + zlib.crc32(kind + data).to_bytes(4, 'big'))
  raw = zlib.compress(b'\x00' * ((side + 1) * side), 9)  # gray, filter byte per row
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', side.to_bytes(4, 'big') * 2 + b'\x08\x00\x00\x00\x00')
          + chunk(b'IDAT', raw) + chunk(b'IEND', b''))


BAD_FORMS = {
    # name: (adapter, files, top_k, status, words in the error)
    'unknown_adapter': ('nope', 'png', 5, 404, "unknown adapter 'nope'"),
    'missing_adapter': (None, 'png', 5, 400, "missing form field 'adapter'"),
    'missing_image': ('probe', [], 5, 400, "missing form field 'image'"),
    'empty_file': ('probe', [('a.png', b'')], 5, 422, 'is empty (0 bytes)'),
    'truncated_png': ('probe', 'truncated', 5, 422, 'truncated'),
    'text_file': ('probe', [('a.jpg', b'hello, not an image')], 5, 422, 'not a decodable image'),
    'pixel_bomb': ('probe', [('bomb.png', bomb_png(2000))], 5, 413, 'over the limit of 250,000'),
    'too_many_images': ('probe', 'png*5', 5, 400, 'too many images: 5; at most 4'),
    'bad_top_k': ('probe', 'png', 0, 400, 'top_k must be an integer'),
}


@pytest.mark.parametrize('case', sorted(BAD_FORMS))
def test_bad_requests_are_4xx_json_and_the_server_stays_up(served, case):
  adapter, files, top_k, status, words = BAD_FORMS[case]
  png = served.images[0]
  if isinstance(files, str):
    files = {'png': [('a.png', png)], 'png*5': [('a.png', png)] * 5,
             'truncated': [('t.png', png[:len(png) // 2])]}[files]
  got, body = served.post(adapter, files, top_k)
  assert (got, list(body)) == (status, ['error']), body
  assert words in body['error']
  assert serve_load.get(served.port, '/healthz')[0] == 200


def raw_request(port, head, body=b''):
  """(status, body) of a request written by hand on a socket."""
  with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
    s.sendall(head + body)
    data = b''
    while chunk := s.recv(65536):
      data += chunk
  status = int(data.split(b' ', 2)[1])
  return status, data.split(b'\r\n\r\n', 1)[1]


def test_an_oversized_body_is_refused_before_it_is_read(served):
  head = (b'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; '
          b'boundary=b\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n')
  status, body = raw_request(served.port, head)  # not one byte of the gigabyte is sent
  assert status == 413 and b'over the limit' in body


def test_a_chunked_body_is_refused_once_it_passes_the_limit(served):
  head = (b'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; '
          b'boundary=b\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n')
  piece = b'x' * 32768
  part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
          b'Content-Type: image/png\r\n\r\n')
  with socket.create_connection(('127.0.0.1', served.port), timeout=30) as s:
    s.sendall(head + f'{len(part):x}\r\n'.encode() + part + b'\r\n')
    for sent in range(64):  # 2 MiB in all, unless answered first; the limit is 0.25 MiB
      s.sendall(f'{len(piece):x}\r\n'.encode() + piece + b'\r\n')
      if select.select([s], [], [], 0.1)[0]:
        break
    reply = s.recv(65536)
    while not reply.endswith(b'}') and select.select([s], [], [], 5)[0]:
      reply += s.recv(65536)
  assert reply.startswith(b'HTTP/1.1 413') and b'over the limit' in reply, reply[:200]
  assert sent < 16  # answered soon after the limit: the body was not read whole
  assert serve_load.get(served.port, '/healthz')[0] == 200


def test_concurrent_load_loses_and_mixes_up_nothing(served):
  names = list(served.dirs)
  expected = serve_load.references(served.port, names, served.images)
  stats = serve_load.run_load(served.port, names, served.images, expected, clients=4,
                              per_client=15, bad_every=5)
  assert stats['wrong'] == 0 and stats['answered'] == 4 * 15 - stats['bad_sent']
  assert stats['bad_refused'] == stats['bad_sent'] > 0
  assert stats['mean_batch'] > 1, stats


def test_the_page_classifies_a_chosen_image_in_headless_chromium(served, tmp_path):
  import serve_screenshot  # pylint: disable=g-import-not-at-top  # selenium, only here
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  image = tmp_path / 'upload.png'
  image.write_bytes(served.images[3])
  driver = serve_screenshot.chromium()
  try:
    serve_screenshot.classify_on_page(driver, f'http://127.0.0.1:{served.port}/', 'colors_vpt',
                                      str(image), adapters=len(served.dirs))
    assert driver.find_element(By.ID, 'error').text == ''
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '.row .label')]
    probs = [float(e.text) for e in driver.find_elements(By.CSS_SELECTOR, '.row .prob')]
    widths = [e.size['width'] for e in driver.find_elements(By.CSS_SELECTOR, '.row .bar')]
    assert 'ms' in driver.find_element(By.ID, 'latency').text
  finally:
    driver.quit()
  _, body = served.post('colors_vpt', [('upload.png', served.images[3])], top_k=5)
  assert labels == [p['label'] for p in body['predictions'][0]]
  np.testing.assert_allclose(probs, [p['prob'] for p in body['predictions'][0]], atol=1e-3)
  assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_sigterm_finishes_the_request_in_flight_and_exits_0(served):
  boundary = 'b0undary'
  body = (f'--{boundary}\r\nContent-Disposition: form-data; name="adapter"\r\n\r\nprobe\r\n'
          f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
          'Content-Type: image/png\r\n\r\n').encode() + served.images[1] + \
      f'\r\n--{boundary}--\r\n'.encode()
  head = (f'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; '
          f'boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n').encode()
  with socket.create_connection(('127.0.0.1', served.port), timeout=60) as s:
    s.sendall(head + body[:len(body) // 2])  # the request is in flight, its body half sent
    time.sleep(0.5)
    served.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no new connections once stopping
      http.client.HTTPConnection('127.0.0.1', served.port, timeout=5).request('GET', '/healthz')
    s.sendall(body[len(body) // 2:])
    reply = b''
    while chunk := s.recv(65536):
      reply += chunk
      if b'"predictions"' in reply and reply.rstrip().endswith(b'}'):
        break
  assert reply.startswith(b'HTTP/1.1 200'), reply[:300]
  assert served.proc.wait(60) == 0
  assert 'stopped: requests in flight finished.' in served.proc.stdout.read()
