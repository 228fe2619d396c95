"""One-line user errors: the gist of a library exception, the closest name."""
from adaptformer_jax import errors


def test_first_line_is_the_gist_of_an_error():
  assert errors.first_line(ValueError('bad thing\n  details')) == 'bad thing'
  assert errors.first_line(KeyError()) == 'KeyError'
  # A long path keeps its end (a 200-character cut once hid which file was damaged).
  long = f'/tmp/{"d" * 400}/file: content differs from its SHA-256 in manifest.sha256'
  assert errors.first_line(ValueError(long)) == long
  assert errors.first_line(ValueError('x' * 5000)) == 'x' * 1000 + '…'


def test_did_you_mean_names_the_closest_choice_or_nothing():
  assert errors.did_you_mean('adaptfromer', ['adaptformer', 'linear']) == \
      " (did you mean 'adaptformer'?)"
  assert errors.did_you_mean('zzz', ['adaptformer', 'linear']) == ''


def test_described_names_the_type_once():
  assert errors.described(ValueError('bad thing\n  details')) == 'ValueError: bad thing'
  # An empty message once gave 'ValueError: ValueError'.
  assert errors.described(ValueError()) == 'ValueError'
