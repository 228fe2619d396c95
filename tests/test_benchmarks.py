"""The benchmarks run where TensorFlow is absent, and gpu_check's CPU path runs end to end."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, 'benchmarks')
sys.path.insert(0, BENCHMARKS)
import hlo_report  # noqa: E402  pylint: disable=g-import-not-at-top
import step_profile  # noqa: E402  pylint: disable=g-import-not-at-top

# A GPU program's shapes (batch 2, 3 tokens): a cuBLASLt matmul with a fused epilogue, a
# transpose into cuDNN attention and a copy out of it, a Pallas kernel, a bf16 -> f32 convert.
GPU_HLO = """HloModule jit_train_step

%fused_transpose (param_0: bf16[2,3,4,8]) -> bf16[2,4,3,8] {
  %param_0 = bf16[2,3,4,8]{3,2,1,0} parameter(0)
  ROOT %transpose.1 = bf16[2,4,3,8]{3,2,1,0} transpose(bf16[2,3,4,8]{3,2,1,0} %param_0), dimensions={0,2,1,3}
}

%fused_convert (param_0.1: bf16[2,3,32]) -> f32[2,3,32] {
  %param_0.1 = bf16[2,3,32]{2,1,0} parameter(0)
  ROOT %convert.1 = f32[2,3,32]{2,1,0} convert(bf16[2,3,32]{2,1,0} %param_0.1)
}

ENTRY %main (p0: bf16[2,3,32], p1: bf16[32,32]) -> f32[2,3,32] {
  %p0 = bf16[2,3,32]{2,1,0} parameter(0)
  %p1 = bf16[32,32]{1,0} parameter(1)
  %gemm = (bf16[6,32]{1,0}, s8[1024]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"alpha_real":1,"epilogue":"BIAS_GELU"}}
  %gte = bf16[6,32]{1,0} get-tuple-element(%gemm), index=0
  %bitcast = bf16[2,3,4,8]{3,2,1,0} bitcast(%gte)
  %fusion.t = bf16[2,4,3,8]{3,2,1,0} fusion(%bitcast), kind=kLoop, calls=%fused_transpose
  %fmha = (bf16[2,4,3,8]{3,2,1,0}, u8[0]{0}) custom-call(%fusion.t, %fusion.t, %fusion.t), custom_call_target="__cudnn$fmhaSoftmax"
  %gte.1 = bf16[2,4,3,8]{3,2,1,0} get-tuple-element(%fmha), index=0
  %copy.2 = bf16[2,4,3,8]{3,2,0,1} copy(%gte.1)
  %pallas = bf16[6,64]{1,0} custom-call(%p0, %p1), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"norm_fc1_kernel"}
  ROOT %fusion.c = f32[2,3,32]{2,1,0} fusion(%p0), kind=kLoop, calls=%fused_convert
}
"""
NO_TENSORFLOW = os.path.join(ROOT, 'tests', 'no_tensorflow')  # its sitecustomize blocks TF
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32)


def run_without_tensorflow(args, tmp_path, timeout):
  """(process, attempted TF imports) of `python args` with TensorFlow and tfds unimportable."""
  log = tmp_path / 'tf_imports.log'
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([NO_TENSORFLOW, BENCHMARKS, ROOT]),
             TF_IMPORT_LOG=str(log), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=timeout)
  return proc, log.read_text() if log.exists() else ''


def test_hlo_report_finds_epilogues_converts_and_layout_ops_at_attention():
  report = hlo_report.summary(GPU_HLO, batch=2, tokens=3)
  assert report['gemms'] == {'__cublas$lt$matmul': 1, 'Pallas/Triton kernel': 1}
  assert report['epilogues'] == {'BIAS_GELU': 1} and report['epilogue_mentions'] == 1
  assert report['converts'] == {'bf16->f32': 1}
  # The transpose fusion feeding cuDNN and the copy reading it, not the bitcast before.
  assert report['layout_ops_around_attention']['count'] == 2
  # gemm, fusion.t, fmha, copy.2, pallas in bf16 (parameters are not written); fusion.c f32
  assert {t: w['count'] for t, w in report['activations_written'].items()} == {'bf16': 5,
                                                                               'f32': 1}
  assert report['activations_written']['f32']['mib'] == round(2 * 3 * 32 * 4 / 2**20, 3)
  assert step_profile.instruction_kinds(GPU_HLO)['pallas'][0] == 'Pallas kernel'


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
  assert ('--parts: unknown jx; choose from flops,jax,variants,flags,kernels,profile,torch,'
          'pipeline') in proc.stderr
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
  # Only the XLA flag that XLA does not know fails, saying so.
  errors = [r for r in rows if 'error' in r]
  assert [r['row'].get('xla_flags') for r in errors] == ['--xla_no_such_flag=1'], errors
  assert 'Unknown flag in XLA_FLAGS: --xla_no_such_flag=1' in errors[0]['error']
  steps = [r for r in rows if r['kind'] == 'step']
  jax_rows = [r for r in steps if r['framework'] == 'jax' and 'error' not in r]
  # adaptformer and full, plus the attention='xla', frozen_dtype='bfloat16' and
  # no-class-token rows, then 3 variants and 1 flag variant, each with its FLOPs from the
  # CPU lowering (the FLOPs of XLA's program: options, flags and kernels share them).
  assert len(jax_rows) == 9 and all(r['ms'] > 0 for r in jax_rows)
  import gpu_check  # pylint: disable=g-import-not-at-top
  flops = {gpu_check.flops_key(r['row']): r['flops'] for r in rows
           if r['kind'] == 'flops' and 'row' in r}
  assert all(flops[gpu_check.flops_key(r['row'])] > 0 for r in jax_rows)
  assert [r['model'] for r in rows if r['kind'] == 'flops' and r.get('per_image', 0) > 0] == [
      'tiny']
  assert {r['framework'] for r in steps} == {'jax', 'torch eager', 'torch compiled'}
  (max_batch,) = [r for r in rows if r['kind'] == 'max_batch']
  assert max_batch['batch'] >= 1 and max_batch['compiled_bytes'] <= 16 * 2**20
  # The headline step with one change each, beside it as configured; FLOPs for each.
  # (each part times its rows in ascending order of their compiled peak)
  variants = [{}, {'adapter': {'dropout': 0.0}, 'xla': {'xla_cpu_enable_fast_math': False}},
              {'kernels': 'pallas'}, {'xla_flags': '--xla_cpu_enable_fast_math=false'}]
  assert sorted(json.dumps(r['row'], sort_keys=True) for r in jax_rows[5:]) == sorted(
      json.dumps({'tuning': 'adaptformer', 'dtype': 'bfloat16', 'batch': 2, **extra},
                 sort_keys=True) for extra in variants)
  hlo = {json.dumps(r['row'], sort_keys=True): r for r in rows if r['kind'] == 'hlo'}
  assert len(hlo) == 4 and all(r['gemms'].get('dot', 0) > 0 for r in hlo.values())
  (check,) = [r for r in rows if r['kind'] == 'attention_check']
  # On the CPU 'auto' is XLA: the same errors against f32, small but not zero (bf16).
  assert check['auto_is'] == 'xla' and check['tokens'] == 17
  assert check['auto_grads_rel_err'] == check['xla_grads_rel_err']
  assert 0 < check['auto_logits_rel_err'] < 0.05 and 0 < check['auto_grads_rel_err'] < 0.05
  # The fused kernels (interpreted) as close to f32 as XLA's bf16, whole model and alone.
  assert 0 < check['pallas_logits_rel_err'] < 0.05 and 0 < check['pallas_grads_rel_err'] < 0.05
  kernel_rows = [r for r in rows if r['kind'] == 'kernel']
  assert [r['impl'] for r in kernel_rows] == ['xla', 'pallas']
  assert all(r['ms'] > 0 and 0 < r['dx_rel_err'] < 0.02 for r in kernel_rows)
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
