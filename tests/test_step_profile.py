"""benchmarks/step_profile.py: traced operations map to kinds and model parts, GPU tracks apart."""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import step_profile  # noqa: E402  pylint: disable=g-import-not-at-top

# The shapes of a GPU program's text: cuBLAS/cuDNN custom calls next to XLA fusions.
GPU_HLO = '''HloModule jit_train_step

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%fused_reduce (p: f32[8,16]) -> f32[8] {
  %p = f32[8,16]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(f32[8,16]{1,0} %p, f32[] %zero), dimensions={1}, to_apply=%add
}

%fused_scores (a: f32[2,4,8,16], b: f32[2,4,8,16]) -> f32[2,4,8,8] {
  %a = f32[2,4,8,16]{3,2,1,0} parameter(0)
  %b = f32[2,4,8,16]{3,2,1,0} parameter(1)
  ROOT %d = f32[2,4,8,8]{3,2,1,0} dot(%a, %b), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={3}
}

%fused_transpose (t: f32[8,16]) -> f32[16,8] {
  %t = f32[8,16]{1,0} parameter(0)
  ROOT %tr = f32[16,8]{1,0} transpose(%t), dimensions={1,0}
}

%fused_gelu (g: f32[8,16]) -> f32[8,16] {
  %g = f32[8,16]{1,0} parameter(0)
  ROOT %e = f32[8,16]{1,0} erf(%g)
}

ENTRY %main (x: f32[8,16], w: f32[16,16], a: f32[2,4,8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,16]{1,0} parameter(1)
  %a = f32[2,4,8,16]{3,2,1,0} parameter(2)
  %gemm = (f32[8,16]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/jvp(VisionTransformer)/block3/mlp/fc1/dot_general"}
  %bmm = (f32[2,4,8,8]{3,2,1,0}, s8[64]{0}) custom-call(%a, %a), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":["0","1"]}}}
  %fmha = (f32[2,4,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(train_step)/jvp(VisionTransformer)/block3/attn/dot_product_attention"}
  %scores = f32[2,4,8,8]{3,2,1,0} fusion(%a, %a), kind=kCustom, calls=%fused_scores, metadata={op_name="jit(train_step)/transpose(jvp(VisionTransformer))/block0/attn/dot_general"}
  %conv = (f32[8,16]{1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward"
  %red = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_reduce
  %tr = f32[16,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_transpose
  %gelu = f32[8,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_gelu, metadata={op_name="jit(train_step)/jvp(VisionTransformer)/block11/mlp/gelu"}
  ROOT %loop = f32[8,16]{1,0} while(%x), condition=%fused_gelu, body=%fused_gelu
}
'''


def test_instructions_of_a_gpu_program_get_their_kinds():
  kinds = step_profile.instruction_kinds(GPU_HLO)
  assert {name: kinds[name][0] for name in
          ('gemm', 'bmm', 'fmha', 'scores', 'conv', 'red', 'tr', 'gelu', 'loop')} == {
              'gemm': 'matmul', 'bmm': 'attention matmul', 'fmha': 'attention (cuDNN)',
              'scores': 'attention matmul', 'conv': 'convolution', 'red': 'reduce',
              'tr': 'copy/transpose', 'gelu': 'elementwise',
              'loop': None}  # a while's time is its body's
  assert kinds['gemm'][1].endswith('block3/mlp/fc1/dot_general')


def test_model_part_folds_blocks_and_keeps_forward_and_backward_apart():
  part = step_profile.model_part
  assert part('jit(train_step)/jvp(VisionTransformer)/block3/mlp/fc1/dot_general') == \
      'forward block*/mlp/fc1'
  assert part('jit(train_step)/transpose(jvp(VisionTransformer))/block10/attn/dot_general') == \
      'backward block*/attn'
  assert part('jit(train_step)/add') == 'outside the model (loss, update)'


def test_gpu_summary_counts_device_kernels_only_and_busy_time_once():
  kinds = step_profile.instruction_kinds(GPU_HLO)
  host, device = 1, 2
  events = [
      {'ph': 'M', 'name': 'process_name', 'pid': host, 'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'name': 'process_name', 'pid': device, 'args': {'name': '/device:GPU:0'}},
      {'ph': 'X', 'pid': host, 'ts': 0, 'dur': 500, 'name': 'launch', 'args': {'hlo_op': 'gemm'}},
      {'ph': 'X', 'pid': device, 'ts': 0, 'dur': 100, 'name': 'sm90_gemm',
       'args': {'hlo_op': 'gemm'}},
      {'ph': 'X', 'pid': device, 'ts': 50, 'dur': 100, 'name': 'fmha', 'args': {'hlo_op': 'fmha'}},
      {'ph': 'X', 'pid': device, 'ts': 400, 'dur': 40, 'name': 'gelu', 'args': {'hlo_op': 'gelu'}},
      {'ph': 'X', 'pid': device, 'ts': 500, 'dur': 10, 'name': 'Memcpy', 'args': {}},
      {'ph': 'X', 'pid': device, 'ts': 600, 'dur': 30, 'name': 'loop', 'args': {'hlo_op': 'loop'}},
  ]
  summary = step_profile.summarize(events, kinds, num_steps=2, wall=0.001)
  assert summary['wall_ms'] == 0.5
  assert summary['kinds_ms'] == {'attention (cuDNN)': 0.05, 'matmul': 0.05, 'elementwise': 0.02}
  assert summary['busy_ms'] == 0.095  # (150 overlapping + 40) us over 2 steps
  assert summary['unmatched_device_ms'] == 0.005
  assert summary['parts'][0] == {'part': 'forward block*/mlp/fc1', 'ms': 0.05, 'kinds': ['matmul']}


def test_a_traced_cpu_program_splits_into_dense_and_batched_matmuls():
  x, w = jnp.ones((64, 128)), jnp.ones((128, 128))
  q = jnp.ones((4, 8, 32, 16))

  @jax.jit
  def f(x, w, q):
    scores = jnp.einsum('bhqd,bhkd->bhqk', q, q)
    return jnp.tanh(x @ w).sum() + jax.nn.softmax(scores).sum()

  compiled = f.lower(x, w, q).compile()
  run = lambda: jax.block_until_ready(compiled(x, w, q))
  run()
  summary = step_profile.profile(compiled.as_text(), run, num_steps=1)
  assert summary['kinds_ms'].get('matmul', 0) > 0
  assert summary['kinds_ms'].get('attention matmul', 0) > 0
  assert summary['busy_ms'] > 0 and summary['unmatched_device_ms'] == 0
  assert 'matmul' in step_profile.report(summary)
