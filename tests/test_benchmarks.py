"""The benchmarks run where TensorFlow is absent, and gpu_check's CPU path runs end to end."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, 'benchmarks')
NO_TENSORFLOW = os.path.join(ROOT, 'tests', 'no_tensorflow')  # its sitecustomize blocks TF
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32)


def run_without_tensorflow(args, tmp_path, timeout):
  """(process, attempted TF imports) of `python args` with TensorFlow and tfds unimportable."""
  log = tmp_path / 'tf_imports.log'
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([NO_TENSORFLOW, BENCHMARKS]),
             TF_IMPORT_LOG=str(log), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=timeout)
  return proc, log.read_text() if log.exists() else ''


def test_the_blocker_sees_a_tensorflow_import(tmp_path):
  """The check below can fail: the tf.data pipeline does import TensorFlow."""
  proc, attempts = run_without_tensorflow(
      ['-c', 'import adaptformer_jax.data.pipeline'], tmp_path, timeout=120)
  assert proc.returncode != 0
  assert 'adaptformer_jax/data/pipeline.py' in attempts


def test_benchmark_train_step_never_imports_tensorflow(tmp_path):
  code = ('import sys, steps\n'
          f"step, flops = steps.jax_step('adaptformer', 2, **{TINY!r})\n"
          'step(); step()\n'
          "print('tensorflow loaded:', any(m.startswith('tensorflow') and mod is not None\n"
          "                                  for m, mod in sys.modules.items()))\n")
  proc, attempts = run_without_tensorflow(['-c', code], tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert attempts == '', f'TensorFlow imported on the step path:\n{attempts}'
  assert 'tensorflow loaded: False' in proc.stdout


def test_gpu_check_names_an_unknown_part_and_runs_nothing(tmp_path):
  proc, _ = run_without_tensorflow([os.path.join(BENCHMARKS, 'gpu_check.py'), '--parts=jax,jx',
                                    f'--out={tmp_path / "out"}'], tmp_path, timeout=120)
  assert proc.returncode == 2
  assert '--parts: unknown jx; choose from flops,jax,variants,profile,torch,pipeline' in proc.stderr
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part_without_tensorflow(tmp_path):
  out = tmp_path / 'out'
  proc, attempts = run_without_tensorflow(
      [os.path.join(BENCHMARKS, 'gpu_check.py'), '--cpu_smoke', f'--out={out}',
       '--budget_s=3000'], tmp_path, timeout=3100)  # ~1 min idle; ample for a loaded host
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Only the pipeline part's optional tf.data timing may try TensorFlow.
  assert all('gpu_check.py' in line for line in attempts.splitlines()), attempts
  rows = json.loads((out / 'gpu_check.json').read_text())
  errors = [r for r in rows if 'error' in r]
  assert not errors, errors
  steps = [r for r in rows if r['kind'] == 'step']
  jax_rows = [r for r in steps if r['framework'] == 'jax']
  # adaptformer and full, plus the attention='xla', frozen_dtype='bfloat16' and
  # no-class-token rows, then 2 variants, each with its FLOPs from the CPU lowering.
  assert len(jax_rows) == 7 and all(r['ms'] > 0 for r in jax_rows)
  flops = {json.dumps(r['row'], sort_keys=True): r['flops'] for r in rows
           if r['kind'] == 'flops' and 'row' in r}
  assert all(flops[json.dumps(r['row'], sort_keys=True)] > 0 for r in jax_rows)
  assert [r['model'] for r in rows if r['kind'] == 'flops' and r.get('per_image', 0) > 0] == [
      'tiny']
  assert {r['framework'] for r in steps} == {'jax', 'torch eager', 'torch compiled'}
  (max_batch,) = [r for r in rows if r['kind'] == 'max_batch']
  assert max_batch['batch'] >= 1 and max_batch['compiled_bytes'] <= 16 * 2**20
  # The headline step with one change each, beside it as configured; FLOPs for each.
  # (each part times its rows in ascending order of their compiled peak)
  assert sorted(json.dumps(r['row'], sort_keys=True) for r in jax_rows[5:]) == sorted(
      json.dumps({'tuning': 'adaptformer', 'dtype': 'bfloat16', 'batch': 2, **extra},
                 sort_keys=True) for extra in (
          {}, {'adapter': {'dropout': 0.0}, 'xla': {'xla_cpu_enable_fast_math': False}}))
  (check,) = [r for r in rows if r['kind'] == 'attention_check']
  # On the CPU 'auto' is XLA: the same errors against f32, small but not zero (bf16).
  assert check['auto_is'] == 'xla' and check['tokens'] == 17
  assert check['auto_grads_rel_err'] == check['xla_grads_rel_err']
  assert 0 < check['auto_logits_rel_err'] < 0.05 and 0 < check['auto_grads_rel_err'] < 0.05
  profiles = [r for r in rows if r['kind'] == 'profile']  # with and without the class token
  assert [r['row'].get('class_token', True) for r in profiles] == [True, False]
  assert all(r['kinds_ms'].get('matmul', 0) > 0 and r['busy_ms'] > 0 for r in profiles)
  assert any(p['part'].startswith('backward block*/') for r in profiles for p in r['parts'])
  (pipeline,) = [r for r in rows if r['kind'] == 'pipeline']
  assert pipeline['img_s_per_core'] > 0 and pipeline['impl'].startswith('PIL')
  assert any('TensorFlow is not installed' in r.get('text', '') for r in rows)
  report = (out / 'gpu_check.md').read_text()
  assert '| jax | adaptformer | bfloat16 | 2 |' in report
  assert '- profile, adaptformer bfloat16 b2, no class token, attention xla: ' in report
  assert ("| jax | adaptformer | bfloat16 | 2 | adapter={'dropout': 0.0}, "
          "xla={'xla_cpu_enable_fast_math': False} |") in report
