"""One command for the first GPU that comes: step time, MFU, memory, PyTorch, max batch, input rate.

Made to run inside a few lent minutes (about 8 on one H100, compiles included),
and to keep what it measured when it is cut off. Its parts run one after the
other, each in its own process with a share of --budget_s (--parts picks some):

  flops    FLOPs of every step below, from XLA's cost analysis on the CPU.
  jax      ViT-B/16 at 224 px, adaptformer and full, bf16 compute (f32 params) and
           f32 (TF32 matmuls, JAX's GPU default), at each of the table's batches:
           ms/step, img/s, MFU, peak device memory; the adaptformer bf16 step
           with model.attention='xla', with model.frozen_dtype='bfloat16' and
           without the class token (196 tokens: 'auto' takes cuDNN's fused
           attention only for even token counts); the largest power-of-two
           batch that fits for ViT-B/16, ViT-L/16 and ViT-H/14 adaptformer (bf16).
  variants the headline step (adaptformer bf16, batch 128) as configured and with
           one change each, timed side by side: model.kernels='pallas' (the fused
           MLP kernels), batch 256, bf16 frozen weights, both (plan.variants; a
           variant may also compile XLA options into its program alone) -- which
           change moves the MFU -- each with hlo_report.py's summary of its
           compiled program (cuBLAS(Lt) epilogues, f32 activations, converts,
           layout ops at attention); then 'auto' and 'xla' attention and the
           fused kernels in bf16 against f32: the relative error of the logits
           and of every gradient.
  flags    the headline step with one XLA flag each (cuDNN LayerNorm, cuDNN GEMM
           fusion levels 1-3, Triton GEMMs off), each in a process of its own with
           the flag in XLA_FLAGS (read when the backend starts); hlo_report too.
  kernels  the MLP branch alone (mlp_kernels.py): XLA against the fused kernels with
           a few tilings, forward and input gradient, errors against f32.
  profile  where the device time of the adaptformer bf16 step goes (197 tokens, and
           196): kernel time by kind, by model part and by instruction
           (step_profile.py), with CUDA graphs off so that every kernel is
           seen; the traces and compiled programs are kept in OUT.
  torch    the same ViT-B/16 steps in PyTorch (CUDA, SDPA, bf16 autocast), and
           torch.compile of the headline step when it compiles within 2
           minutes (skipped with a note when torch is missing).
  pipeline JPEG decode + RandomResizedCrop + flip to 224 px on one CPU core:
           images/s per core (PIL; also the project's tf.data ops if TensorFlow
           is installed), so a reader can see how many cores keep the GPU fed.

Nothing here needs TensorFlow, tfds or timm; without PyTorch the torch part
leaves a note.

MFU = FLOPs / step time / the device's dense bf16 peak (machine.PEAK_BF16_FLOPS).
FLOPs come from XLA's cost analysis of the step lowered for the CPU with
attention='xla' (on the GPU, cuBLAS matmuls and cuDNN attention are custom calls
that the analysis does not count); the PyTorch rows use the FLOPs of the
matching JAX row. Peak memory is
`device.memory_stats()['peak_bytes_in_use']` (a high-water mark, so rows run in
ascending order of their compiled peak; the compiled figure is shown too) and
`torch.cuda.max_memory_allocated()` (reset per row). Max batch: the compiled
peaks at two batches give memory = a + b * batch; the largest power of two under
95% of the device's limit is compiled and run to confirm it (halved if not).

Each result is appended to OUT/rows.jsonl as it is measured; OUT/gpu_check.json
and OUT/gpu_check.md are written at the end (also after a part timed out).

  python benchmarks/gpu_check.py --out DIR [--budget_s 450] [--parts variants,profile]
  python benchmarks/gpu_check.py --fusion --parts flops,variants,flags,kernels,profile,torch \
      --out DIR --budget_s 400     # issue #31's pass, bf16 batch 128 (RESULTS.md)
  python benchmarks/gpu_check.py --quick --parts variants,profile --out DIR --budget_s 150
  python benchmarks/gpu_check.py --cpu_smoke --out DIR   # every code path, tiny model, CPU
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import gzip
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from adaptformer_jax import models  # noqa: E402
from adaptformer_jax.errors import described  # noqa: E402
from adaptformer_jax.models import attention  # noqa: E402
from adaptformer_jax.models import kernels  # noqa: E402
import hlo_report  # noqa: E402
import machine  # noqa: E402
import mlp_kernels  # noqa: E402
import step_profile  # noqa: E402
import steps  # noqa: E402

GIB = 2**30
EVEN_TOKENS = dict(class_token=False, pool='gap')
ROWS_FILE = 'rows.jsonl'
# Row keys that change how a step runs, not its FLOPs (XLA's count of the XLA program).
NOT_FLOPS = ('xla', 'xla_flags', 'kernels', 'attention', 'frozen_dtype')


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to measure: the real check, or its tiny twin for the test suite."""
  model: dict          # preset + overrides of the main table's model
  batches: tuple       # the main table's batches
  dtypes: tuple        # the main table's compute dtypes
  big: tuple           # (label, preset + overrides) whose max batch is searched
  probe_batches: tuple  # two batches whose compiled peaks give the memory line
  max_batch_cap: int
  memory_limit: int | None  # bytes; None = the device's own limit
  sample_s: float      # seconds per timing sample (3 samples per row)
  pipeline_images: int
  crop: int
  torch_compile_backend: str
  torch_compile_s: float  # torch.compile is timed only when it compiles within this
  shares: dict         # fraction of the budget per part
  variants: tuple      # (model overrides, XLA options) of the headline step, timed side by side
  profile_batch: int   # batch of the profiled adaptformer bf16 steps
  profiles: tuple      # (label, model overrides) of the profiled steps, in order of need
  keep_traces: int     # copy the first N profiles' traces (and every profiled program) to OUT
  flag_variants: tuple = ()  # XLA_FLAGS of the headline step, each in a process of its own
  kernel_shape: tuple = (128, 198, 768, 3072)  # (batch, tokens, width, mlp_dim) of `kernels`
  kernel_tiles: tuple = ()  # kernels.Tiles fields of each timed tiling of the fused MLP
  interpret_kernels: bool = False  # Pallas in interpret mode (the CPU smoke run)
  check_attention: bool = True  # the variants part ends with attention_check


TINY = dict(preset='vit_ti16', width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
            image_size=32, adapter=dict(bottleneck=8))
FULL = Plan(model=dict(preset='vit_b16'), batches=(64, 128), dtypes=('bfloat16', 'float32'),
            big=(('ViT-B/16', dict(preset='vit_b16')), ('ViT-L/16', dict(preset='vit_l16')),
                 ('ViT-H/14', dict(preset='vit_h14'))),
            probe_batches=(32, 64), max_batch_cap=8192, memory_limit=None, sample_s=1.0,
            pipeline_images=300, crop=224, torch_compile_backend='inductor',
            torch_compile_s=120,
            shares=dict(flops=0.06, jax=0.40, variants=0.20, flags=0.20, kernels=0.05,
                        profile=0.08, torch=0.21, pipeline=0.05),
            variants=(
                ({}, {}),  # as configured: the baseline measured beside the others
                (dict(kernels='pallas'), {}),  # the MLP branch as fused Pallas kernels
                (dict(batch=256), {}),
                (dict(frozen_dtype='bfloat16'), {}),  # no per-step cast of the frozen weights
                (dict(kernels='pallas', frozen_dtype='bfloat16'), {}),
            ),
            # Each with its own process: XLA reads XLA_FLAGS when the backend starts.
            flag_variants=('--xla_gpu_enable_cudnn_layer_norm=true',
                           '--xla_gpu_cudnn_gemm_fusion_level=1',
                           '--xla_gpu_cudnn_gemm_fusion_level=2',
                           '--xla_gpu_cudnn_gemm_fusion_level=3',
                           '--xla_gpu_enable_triton_gemm=false'),
            kernel_tiles=mlp_kernels.TILINGS,
            profile_batch=128, keep_traces=2,
            profiles=(('profile_197', {}), ('profile_pallas', dict(kernels='pallas'))))
# One of each kind of row; torch.compile without inductor's C++ build (minutes on 2 cores).
SMOKE = Plan(model=TINY, batches=(2,), dtypes=('bfloat16',), big=(('tiny', TINY),),
             probe_batches=(2, 4), max_batch_cap=32, memory_limit=16 * 2**20, sample_s=0.02,
             pipeline_images=6, crop=32, torch_compile_backend='eager',
             torch_compile_s=float('inf'),  # the budget decides on a loaded test host
             shares=dict(flops=0.1, jax=0.3, variants=0.1, flags=0.1, kernels=0.1, profile=0.1,
                         torch=0.3, pipeline=0.1),
             variants=(({}, {}), (dict(adapter=dict(dropout=0.0)),
                                  {'xla_cpu_enable_fast_math': False}),
                       (dict(kernels='pallas'), {})),
             # The second one XLA does not know: its row says so, the others run.
             flag_variants=('--xla_cpu_enable_fast_math=false', '--xla_no_such_flag=1'),
             kernel_shape=(2, 17, 32, 48),
             kernel_tiles=((16, 32, 16, 4, 2),), interpret_kernels=True,
             profile_batch=2, keep_traces=0,
             profiles=(('profile_197', {}), ('profile_196', EVEN_TOKENS)))


# Issue #31's pass: the headline step with each XLA flag and the fused kernels, the kernels
# alone, profiles with and without them, PyTorch's adaptformer and full steps beside them.
# The fused kernels' profile first: the configured step's is in RESULTS.md (2026-11-27).
FUSION = dataclasses.replace(
    FULL, batches=(128,), dtypes=('bfloat16',),
    profiles=(('profile_pallas', dict(kernels='pallas')), ('profile_197', {})),
    shares=dict(flops=0.06, variants=0.24, flags=0.28, kernels=0.08, profile=0.10, torch=0.24))


def emit(out, row):
  """Appends one result to OUT/rows.jsonl at once (survives a later timeout) and prints it."""
  row = {'at': round(time.time(), 1), **row}
  with open(os.path.join(out, ROWS_FILE), 'a') as f:
    f.write(json.dumps(row) + '\n')
  print(json.dumps(row), flush=True)


def timed(step, sample_s, samples=3):
  """Median seconds per call of `step()` (which waits for its result), after a warm-up."""
  step()
  start = time.perf_counter()
  step()
  n = max(1, math.ceil(sample_s / max(time.perf_counter() - start, 1e-6)))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(n):
      step()
    times.append((time.perf_counter() - start) / n)
  return statistics.median(times)


def table_rows(plan):
  """The main table: (tuning, dtype, batch, extra model overrides)."""
  rows = [dict(tuning=t, dtype=d, batch=b) for d in plan.dtypes
          for t in ('adaptformer', 'full') for b in plan.batches]
  top = max(plan.batches)
  rows += [dict(tuning='adaptformer', dtype='bfloat16', batch=top, attention='xla'),
           dict(tuning='adaptformer', dtype='bfloat16', batch=top, frozen_dtype='bfloat16'),
           # No class token: an even token count (196 for ViT-B/16), where 'auto' is cuDNN.
           dict(tuning='adaptformer', dtype='bfloat16', batch=top, **EVEN_TOKENS)]
  return rows


def variant_rows(plan: Plan) -> list[dict]:
  """The headline step (adaptformer bf16, the largest batch) with each of plan.variants'
  model overrides and XLA options (row['xla'], compiled into that program alone)."""
  headline = dict(tuning='adaptformer', dtype='bfloat16', batch=max(plan.batches))
  return [{**headline, **model, **({'xla': xla} if xla else {})} for model, xla in plan.variants]


def model_cfg(plan_model, row):
  overrides = {k: v for k, v in {**plan_model, **row}.items()
               if k not in ('preset', 'batch', 'xla', 'xla_flags')}
  return steps.model_config(plan_model['preset'], **overrides)


def flops_key(row: dict) -> str:
  """The rows whose steps have the same FLOPs share this key."""
  return json.dumps({k: v for k, v in row.items() if k not in NOT_FLOPS}, sort_keys=True)


def kernel_mode(plan: Plan) -> contextlib.AbstractContextManager:
  """Where the plan interprets Pallas (the CPU smoke run), the context that makes
  model.kernels='pallas' trace; enter it in the thread that traces."""
  return kernels.interpret() if plan.interpret_kernels else contextlib.nullcontext()


# ------------------------------------------------------------------------- flops


def flops_part(plan, out, deadline):
  """FLOPs per step from XLA's cost analysis of each step lowered for the CPU with
  attention='xla' (runs with JAX_PLATFORMS=cpu). On the GPU the analysis misses
  cuBLAS's matmuls and cuDNN's attention (custom calls): jax 0.11.2 on an H100
  answered None for a lowered step and 0.68 of 9.03 TFLOP for a compiled one.
  Max-batch rows get FLOPs per image, lowered at the first probe batch."""
  def flops(model, row):
    trainer = steps.make_trainer(model_cfg(model, {**row, 'attention': 'xla', 'kernels': 'xla'}),
                                 row['batch'])
    return steps.lower_step(trainer, row['batch']).cost_analysis()['flops']

  done = set()  # the variants first: the rows every pass measures
  for row in variant_rows(plan) + table_rows(plan):
    if time.time() < deadline and flops_key(row) not in done:
      done.add(flops_key(row))
      emit(out, dict(kind='flops', row=row, flops=flops(plan.model, row)))
  row = dict(tuning='adaptformer', dtype='bfloat16', batch=plan.probe_batches[0])
  for label, model in plan.big:
    if time.time() < deadline:
      emit(out, dict(kind='flops', model=label, per_image=flops(model, row) / row['batch']))


# --------------------------------------------------------------------------- jax


def device_header(out: str, part: str) -> jax.Device:
  """Emits the device and versions; returns the device. The GPU's compiles are cached."""
  device = jax.devices()[0]
  if device.platform == 'gpu':
    jax.config.update('jax_compilation_cache_dir', '/tmp/gpu_check_jax_cache')
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  emit(out, dict(kind='device', part=part, device_kind=device.device_kind,
                 platform=device.platform, jax=jax.__version__, flax=flax.__version__,
                 optax=optax.__version__, bytes_limit=(device.memory_stats() or {}).get(
                     'bytes_limit'), peak_bf16_flops=machine.peak_flops(device),
                 matmul_precision=str(jax.config.jax_default_matmul_precision),
                 host=machine.describe()))
  return device


def time_rows(plan: Plan, rows: list[dict], out: str, deadline: float,
              hlo: bool = False) -> list[dict]:
  """Compiles `rows` (in parallel threads), then times them one by one in ascending order
  of their compiled peak, emitting each (with `hlo`, first its hlo_report); returns the
  results."""
  programs = prepare_all(plan, rows)
  programs.sort(key=lambda p: p.get('compiled_bytes') or 0)
  for p in programs:
    if hlo and 'program' in p:
      trainer, compiled = p['program']
      cfg = trainer.run.config.model
      n = tokens(cfg) + attention.pad_tokens(cfg, cfg.dtype, tokens(cfg))
      emit(out, dict(kind='hlo', row=p['row'], **hlo_report.summary(
          compiled.as_text(), p['row']['batch'], n)))
    if 'error' not in p and time.time() > deadline:
      p['error'] = 'skipped: out of budget'
    if 'error' not in p:
      p.update(run_jax(p.pop('program'), plan.sample_s))
    p.pop('program', None)
    emit(out, dict(kind='step', framework='jax', model=plan.model['preset'], **p))
  return programs


def jax_part(plan, out, deadline):
  device = device_header(out, 'jax')
  limit = plan.memory_limit or (device.memory_stats() or {}).get('bytes_limit')
  peaks = {(p['row']['tuning'], p['row']['dtype'], p['row']['batch']): p['compiled_bytes']
           for p in time_rows(plan, table_rows(plan), out, deadline)
           if p['row'].keys() == {'tuning', 'dtype', 'batch'} and 'compiled_bytes' in p}
  for label, model in plan.big:
    if time.time() > deadline:
      emit(out, dict(kind='max_batch', model=label, error='skipped: out of budget'))
      continue
    probes = {b: peaks[key] for b in plan.probe_batches
              if model == plan.model and (key := ('adaptformer', 'bfloat16', b)) in peaks}
    emit(out, dict(kind='max_batch', model=label, **max_batch(
        plan, model, limit, probes, deadline)))


def variants_part(plan: Plan, out: str, deadline: float) -> None:
  """The headline step with other attention, token counts, XLA options or model choices,
  timed side by side with it as configured: which change moves the MFU."""
  device_header(out, 'variants')
  time_rows(plan, variant_rows(plan), out, deadline, hlo=True)
  if plan.check_attention:
    attention_check(plan, out)


def flags_part(plan: Plan, out: str, deadline: float) -> None:
  """The headline step with each of plan.flag_variants added to XLA_FLAGS, each in a process
  of its own (XLA reads the flags once, as its backend starts): time, memory, hlo_report."""
  headline = variant_rows(plan)[0]
  for flags in plan.flag_variants:
    row = {**headline, 'xla_flags': flags}
    failed = lambda why: emit(out, dict(kind='step', framework='jax', model=plan.model['preset'],
                                        row=row, error=why))
    if deadline - time.time() < 15:
      failed('skipped: out of budget')
      continue
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    args = [sys.executable, __file__, '--part=flag_variant', f'--out={out}',
            f'--row={json.dumps(row)}', f'--deadline={deadline}'] + (
                ['--cpu_smoke'] if plan.interpret_kernels else [])
    try:
      proc = subprocess.run(args, env=env, timeout=deadline - time.time(), check=False,
                            capture_output=True, text=True)
      print(proc.stdout, end='', flush=True)
      if proc.returncode:  # e.g. a flag this XLA does not know: it exits at backend start
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        failed(f"exited with status {proc.returncode}: {' | '.join(lines[-2:])[-400:]}")
    except subprocess.TimeoutExpired:
      failed("stopped at the part's deadline")


def flag_variant_part(plan: Plan, out: str, row: dict, deadline: float) -> None:
  time_rows(plan, [row], out, deadline, hlo=True)


def kernels_part(plan: Plan, out: str, deadline: float) -> None:
  """The MLP branch alone (mlp_kernels.py) at plan.kernel_shape: XLA and the fused kernels
  with each of plan.kernel_tiles, forward and input gradient, bf16; errors against f32."""
  del deadline  # a few small compiles
  device_header(out, 'kernels')
  for row in mlp_kernels.measure(plan.kernel_shape, plan.kernel_tiles, plan.interpret_kernels,
                                 lambda step: timed(step, plan.sample_s)):
    emit(out, dict(kind='kernel', **row))


def compile_step(plan_model, row):
  """(trainer, compiled) step of one row, for abstract state (nothing allocated).

  Where attention 'auto' picked cuDNN and cuDNN fails, the row falls back to XLA's
  attention (its `attention` then reads 'xla') rather than losing every bf16 row.
  """
  trainer = steps.make_trainer(model_cfg(plan_model, row), row['batch'])
  try:
    return trainer, steps.lower_step(trainer, row['batch']).compile(
        compiler_options=row.get('xla'))
  except Exception as e:  # noqa: BLE001
    if 'attention' in row or attention_used(trainer.run.config.model) == 'xla':
      raise
    print(f'cuDNN attention failed for {row}, using XLA attention: {described(e)}', flush=True)
    return compile_step(plan_model, {**row, 'attention': 'xla'})


def tokens(cfg: ml_collections.ConfigDict) -> int:
  """The blocks' token count: the class token, registers and patches (an image model)."""
  return (cfg.image_size // cfg.patch_size) ** 2 + int(cfg.class_token) + cfg.num_registers


def attention_used(cfg: ml_collections.ConfigDict) -> str:
  """'xla', 'cudnn' or 'cudnn (padded)': what the blocks' self-attention runs on."""
  n = tokens(cfg)
  pad = attention.pad_tokens(cfg, cfg.dtype, n)
  used = attention.attention_implementation(cfg.attention, cfg.dtype, cfg.width // cfg.num_heads,
                                      (n + pad, n + pad))
  return f'{used} (padded)' if pad else used


def prepare_all(plan: Plan, rows: list[dict]) -> list[dict]:
  """prepare() of every row, the compiles in parallel threads."""
  def one(row):
    with kernel_mode(plan):
      return prepare(plan.model, row)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return list(pool.map(one, rows))


def prepare(plan_model, row):
  """Compiles one table row: {'row', 'program', 'compiled_bytes', 'compile_s'}."""
  result = {'row': row}
  try:
    start = time.perf_counter()
    trainer, compiled = compile_step(plan_model, row)
    result.update(attention=attention_used(trainer.run.config.model),
                  compiled_bytes=steps.compiled_peak_bytes(compiled),
                  compile_s=round(time.perf_counter() - start, 1),
                  program=(trainer, compiled))
  except Exception as e:  # noqa: BLE001  one failed row must not end the check
    result['error'] = described(e)
  return result


def run_jax(program, sample_s):
  """Times a compiled step on fresh state: {'ms', 'img_s', 'peak_bytes'} or {'error'}."""
  trainer, compiled = program
  batch = trainer.run.config.batch_size
  try:
    seconds = timed(steps.step_runner(trainer, compiled), sample_s)
    stats = jax.devices()[0].memory_stats() or {}
  except Exception as e:  # noqa: BLE001  e.g. RESOURCE_EXHAUSTED
    return {'error': described(e)}
  return {'ms': round(seconds * 1e3, 2), 'img_s': round(batch / seconds, 1),
          'peak_bytes': stats.get('peak_bytes_in_use')}


def attention_check(plan: Plan, out: str, batch: int = 8) -> None:
  """model.attention 'auto' and 'xla' in bf16 against 'xla' in f32, on the headline
  model as configured (ViT-B/16: 197 tokens, which 'auto' pads to 198 for cuDNN):
  relative error of the logits and of every parameter's gradient."""
  try:
    import optax  # pylint: disable=g-import-not-at-top
    cfgs = {name: model_cfg(plan.model, dict(dtype=dtype, attention=attention, kernels=k))
            for name, dtype, attention, k in (('auto', 'bfloat16', 'auto', 'xla'),
                                              ('xla', 'bfloat16', 'xla', 'xla'),
                                              ('pallas', 'bfloat16', 'auto', 'pallas'),
                                              ('f32', 'float32', 'xla', 'xla'))}
    size, classes = cfgs['f32'].image_size, cfgs['f32'].num_classes
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.arange(batch) % classes
    built = {name: models.build(c) for name, c in cfgs.items()}
    variables = jax.jit(built['f32'].init)(jax.random.key(1), images)
    params = dict(variables['params'])  # a random head, or no gradient reaches the blocks
    params['head'] = jax.tree.map(lambda a: 0.02 * jax.random.normal(jax.random.key(2), a.shape),
                                  params['head'])

    def logits_and_grads(model):
      def loss(p):
        logits = model.apply({**variables, 'params': p}, images).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
      try:
        with kernel_mode(plan):
          (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
      except Exception as e:  # noqa: BLE001  the fused kernels fail alone, with their error
        return described(e)
      return [logits] + jax.tree.leaves(grads)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the four compile side by side
      results = dict(zip(built, pool.map(logits_and_grads, built.values())))
    relative = lambda got, want: float(
        np.sqrt(sum(np.sum((np.float32(g) - np.float32(w)) ** 2) for g, w in zip(got, want))
                / sum(np.sum(np.float32(w) ** 2) for w in want)))
    emit(out, dict(kind='attention_check', auto_is=attention_used(cfgs['auto']),
                   tokens=tokens(cfgs['auto']), **{
                       f'{name}_{what}_rel_err': relative(results[name][part],
                                                          results['f32'][part])
                       if isinstance(results[name], list) else results[name]
                       for name in ('auto', 'xla', 'pallas')
                       for what, part in (('logits', slice(0, 1)), ('grads', slice(1, None)))}))
  except Exception as e:  # noqa: BLE001
    emit(out, dict(kind='attention_check', error=described(e)))


def max_batch(plan, model, limit, probes, deadline):
  """The largest power-of-two adaptformer bf16 batch whose step fits `limit` bytes, run once."""
  if not limit:
    return {'error': 'the device reports no memory limit'}
  row = dict(tuning='adaptformer', dtype='bfloat16')

  def compile_at(batch):
    trainer, compiled = compile_step(model, {**row, 'batch': batch})
    return trainer, compiled, steps.compiled_peak_bytes(compiled)

  try:
    for b in plan.probe_batches:
      if b not in probes:
        probes[b] = compile_at(b)[2]
    (b1, m1), (b2, m2) = sorted(probes.items())[:2]
    per_image = (m2 - m1) / (b2 - b1)
    fixed = m1 - per_image * b1
    predicted = (0.95 * limit - fixed) / per_image
    batch = 2 ** int(math.log2(predicted)) if predicted >= 1 else 0
    batch = min(batch, plan.max_batch_cap)
    result = {'fixed_gib': round(fixed / GIB, 3), 'per_image_mib': round(per_image / 2**20, 3),
              'predicted': int(predicted)}
    while batch >= 1 and time.time() < deadline:
      trainer, compiled, compiled_bytes = compile_at(batch)
      if compiled_bytes <= limit:
        timing = run_jax((trainer, compiled), plan.sample_s)
        if 'error' not in timing:
          return {**result, 'batch': batch, 'compiled_bytes': compiled_bytes, **timing}
      batch //= 2
    return {**result, 'error': 'no power-of-two batch fits' if batch < 1 else
            'skipped: out of budget'}
  except Exception as e:  # noqa: BLE001
    return {'error': described(e)}


# ----------------------------------------------------------------------- profile


def profile_part(plan, out, deadline, num_steps=3):
  """Device time of the adaptformer bf16 step by kind, model part and instruction
  (step_profile.py) for each of plan.profiles: as configured (ViT-B/16: 197 tokens,
  on a GPU cuDNN attention with one pad token) and at 196 tokens."""
  rows = [dict(tuning='adaptformer', dtype='bfloat16', batch=plan.profile_batch, **extra)
           for _, extra in plan.profiles]
  programs = prepare_all(plan, rows)
  for i, ((label, _), row, p) in enumerate(zip(plan.profiles, rows, programs)):
    if 'error' in p or time.time() > deadline:
      emit(out, dict(kind='profile', row=row, error=p.get('error', 'skipped: out of budget')))
      continue
    try:
      trainer, compiled = p['program']
      run = steps.step_runner(trainer, compiled, num_steps)
      run()  # warm-up
      text = compiled.as_text()
      keep = os.path.join(out, f'{label}.trace.json.gz') if i < plan.keep_traces else None
      summary = step_profile.profile(text, run, num_steps, keep_trace=keep)
      if keep and os.path.getsize(keep) > 15 * 2**20:  # over what the device tool brings back
        os.remove(keep)
      if plan.keep_traces:  # the program, to read the trace's instructions against
        with gzip.open(os.path.join(out, f'{label}.hlo.txt.gz'), 'wt') as f:
          f.write(text)
      emit(out, dict(kind='profile', row=row, attention=attention_used(trainer.run.config.model),
                     **summary))
    except Exception as e:  # noqa: BLE001
      emit(out, dict(kind='profile', row=row, error=described(e)))


# ------------------------------------------------------------------------- torch


def torch_part(plan, out, deadline):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    emit(out, dict(kind='note', text='PyTorch is not installed: no PyTorch rows.'))
    return
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  emit(out, dict(kind='device', part='torch', torch=torch.__version__, device=device,
                 device_kind=torch.cuda.get_device_name() if cuda else 'cpu'))
  for row in table_rows(plan)[:2 * len(plan.dtypes) * len(plan.batches)]:
    if time.time() > deadline:
      emit(out, dict(kind='step', framework='torch eager', row=row, error='skipped: out of budget'))
      continue
    emit(out, dict(kind='step', framework='torch eager', model=plan.model['preset'], row=row,
                   **run_torch(torch, model_cfg(plan.model, row), row['batch'], device,
                               plan.sample_s)))
  headline = dict(tuning='adaptformer', dtype='bfloat16', batch=max(plan.batches))
  remaining = deadline - time.time()
  if remaining < 30:
    emit(out, dict(kind='step', framework='torch compiled', row=headline,
                   error='skipped: out of budget'))
    return
  args = [sys.executable, __file__, '--part=torch_compile', f'--out={out}',
          f'--row={json.dumps(headline)}'] + (['--cpu_smoke'] if plan is SMOKE else [])
  limit = min(remaining, plan.torch_compile_s + 30)  # the compile, then a few timed steps
  try:
    subprocess.run(args, timeout=limit, check=False)
  except subprocess.TimeoutExpired:
    emit(out, dict(kind='step', framework='torch compiled', row=headline,
                   error=f'torch.compile did not compile and time within {limit:.0f} s'))


def torch_compile_part(plan, out, row):
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  emit(out, dict(kind='step', framework='torch compiled', model=plan.model['preset'], row=row,
                 **run_torch(torch, model_cfg(plan.model, row), row['batch'], device,
                             plan.sample_s, compile_backend=plan.torch_compile_backend)))


def run_torch(torch, cfg, batch, device, sample_s, compile_backend=None):
  try:
    if device == 'cuda':
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    step = steps.torch_step(cfg, batch, device, compile_backend=compile_backend)
    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    seconds = timed(step, sample_s)
    peak_bytes = torch.cuda.max_memory_allocated() if device == 'cuda' else None
    del step
  except Exception as e:  # noqa: BLE001  e.g. CUDA out of memory, a failed compile
    return {'error': described(e)}
  return {'ms': round(seconds * 1e3, 2), 'img_s': round(batch / seconds, 1),
          'peak_bytes': peak_bytes, 'first_step_s': round(first_s, 1)}


# ---------------------------------------------------------------------- pipeline


def synthetic_jpegs(n, width=500, height=375, seed=0):
  """Photo-like JPEGs (smooth colour fields plus grain) of ImageNet's typical size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(n):
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.int16)
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, 'JPEG',
                                                                           quality=90)
    jpegs.append(buf.getvalue())
  return jpegs


def pipeline_part(plan, out, deadline):
  del deadline
  jpegs = synthetic_jpegs(plan.pipeline_images)
  kib = sum(map(len, jpegs)) / len(jpegs) / 1024
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    size = plan.crop
    try:
      from torchvision import transforms  # pylint: disable=g-import-not-at-top
      crop = transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BICUBIC)
      flip = transforms.RandomHorizontalFlip()
      augment, impl = lambda img: flip(crop(img)), 'PIL decode + torchvision RandomResizedCrop'
    except (ImportError, RuntimeError):  # RuntimeError: its compiled ops do not fit this torch
      def augment(img):
        # RandomResizedCrop's window (scale 0.08-1, ratio 3/4-4/3), clipped: for timing only.
        area = img.width * img.height * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(img.width, round(math.sqrt(area * ratio)))
        h = min(img.height, round(math.sqrt(area / ratio)))
        x, y = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
        img = img.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
        return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img
      impl = 'PIL decode + PIL bicubic crop-resize (RandomResizedCrop window)'

    def one(jpeg):
      return np.asarray(augment(Image.open(io.BytesIO(jpeg)).convert('RGB')))

    one(jpegs[0])
    start = time.perf_counter()
    for jpeg in jpegs:
      one(jpeg)
    emit(out, dict(kind='pipeline', impl=impl + f' + flip to {size} px, 1 thread',
                   img_s_per_core=round(len(jpegs) / (time.perf_counter() - start), 1),
                   jpeg_kib=round(kib, 1)))
  except Exception as e:  # noqa: BLE001
    emit(out, dict(kind='pipeline', impl='PIL', error=described(e)))
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    emit(out, dict(kind='note', text='TensorFlow is not installed: the tf.data ops were not '
                                     'timed (PIL figure only).'))
    return
  from adaptformer_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  pp = preprocess.make('random_resized_crop|flip', image_size=plan.crop, normalize='imagenet')
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = tf.data.Dataset.from_tensor_slices(jpegs).enumerate().map(
      lambda i, jpeg: pp(tf.io.decode_jpeg(jpeg, channels=3), tf.stack([i, i])),
  ).with_options(options)
  for _ in ds.take(1):
    pass
  start = time.perf_counter()
  count = sum(1 for _ in ds)
  emit(out, dict(kind='pipeline', impl=f'tf.data: tf.io.decode_jpeg + this project\'s '
                                       f'random_resized_crop|flip to {plan.crop} px, 1 thread',
                 img_s_per_core=round(count / (time.perf_counter() - start), 1),
                 jpeg_kib=round(kib, 1)))


# ------------------------------------------------------------------------ report


def read_rows(out):
  path = os.path.join(out, ROWS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def markdown(rows):
  """The tables of gpu_check.md from the collected rows."""
  devices = [r for r in rows if r['kind'] == 'device']
  peak = next((r['peak_bf16_flops'] for r in devices if r.get('peak_bf16_flops')), None)
  lines = ['# gpu_check', '']
  for d in devices:
    lines.append('- ' + ', '.join(f'{k}: {v}' for k, v in d.items() if k not in ('kind', 'at')))
  lines += ['', '| framework | tuning | dtype | batch | variant | ms/step | img/s | MFU | '
            'peak GiB | compiled GiB |', '|---|---|---|---|---|---|---|---|---|---|']
  flops = {flops_key(r['row']): r['flops'] for r in rows
           if r['kind'] == 'flops' and 'row' in r}
  per_image = {r['model']: r['per_image'] for r in rows if r['kind'] == 'flops' and 'model' in r}
  gib = lambda b: f'{b / GIB:.2f}' if b else ''
  for r in rows:
    if r['kind'] != 'step':
      continue
    row = dict(r['row'])
    variant = ', '.join(f'{k}={row.pop(k)}' for k in list(row) if k not in
                        ('tuning', 'dtype', 'batch'))
    if r['framework'] == 'jax' and r.get('attention'):
      variant = variant or f"attention=auto ({r['attention']})"
    f = flops.get(flops_key(r['row']))
    mfu = f'{f / (r["ms"] / 1e3) / peak:.1%}' if f and peak and 'ms' in r else ''
    lines.append(f"| {r['framework']} | {row['tuning']} | {row['dtype']} | {row['batch']} | "
                 f"{variant} | {r.get('ms', r.get('error', ''))} | {r.get('img_s', '')} | "
                 f"{mfu} | {gib(r.get('peak_bytes'))} | {gib(r.get('compiled_bytes'))} |")
  lines += ['', '| max batch (adaptformer, bf16) | batch | ms/step | img/s | MFU | peak GiB | '
            'compiled GiB | memory line |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    if r['kind'] == 'max_batch':
      f = per_image.get(r['model'], 0) * r.get('batch', 0)
      mfu = f'{f / (r["ms"] / 1e3) / peak:.1%}' if f and peak and 'ms' in r else ''
      line = (f"{r['fixed_gib']} GiB + {r['per_image_mib']} MiB/image" if 'fixed_gib' in r
              else '')
      lines.append(f"| {r['model']} | {r.get('batch', r.get('error', ''))} | {r.get('ms', '')} "
                   f"| {r.get('img_s', '')} | {mfu} | {gib(r.get('peak_bytes'))} | "
                   f"{gib(r.get('compiled_bytes'))} | {line} |")
  best = max((r['img_s'] for r in rows if r['kind'] == 'step' and r['framework'] == 'jax'
              and 'img_s' in r), default=None)
  lines += ['', '| input pipeline | img/s per core | cores to feed the best JAX row |',
            '|---|---|---|']
  for r in rows:
    if r['kind'] == 'pipeline' and 'img_s_per_core' in r:
      cores = f"{best / r['img_s_per_core']:.1f}" if best else ''
      lines.append(f"| {r['impl']} | {r['img_s_per_core']} | {cores} |")
  lines.append('')
  for r in rows:
    if r['kind'] == 'profile':
      row = r['row']
      title = (f"profile, {row['tuning']} {row['dtype']} b{row['batch']}"
               f"{', no class token' if 'class_token' in row else ''}, attention {r.get('attention')}")
      if 'error' in r:
        lines.append(f"- {title}: {r['error']}")
        continue
      kinds = ', '.join(f'{k} {ms:.2f}' for k, ms in r['kinds_ms'].items())
      parts = ', '.join(f"{p['part']} {p['ms']:.2f}" for p in r['parts'][:8])
      lines.append(f"- {title}: {r['wall_ms']:.1f} ms/step wall, {r['busy_ms']:.1f} ms busy "
                   f"({r['busy_ms'] / r['wall_ms']:.0%}); ms by kind: {kinds}; "
                   f"no instruction {r['unmatched_device_ms']:.2f}; heaviest parts: {parts}")
  lines += hlo_and_kernel_tables(rows)
  for r in rows:
    if r['kind'] == 'attention_check':
      lines.append(f"- attention 'auto' ({r.get('auto_is')}, {r.get('tokens')} tokens), 'xla' and "
                   f"'auto' with model.kernels='pallas', bf16, relative error against XLA f32: "
                   f"logits {r.get('auto_logits_rel_err')}, {r.get('xla_logits_rel_err')} and "
                   f"{r.get('pallas_logits_rel_err')}; gradients {r.get('auto_grads_rel_err')}, "
                   f"{r.get('xla_grads_rel_err')} and {r.get('pallas_grads_rel_err')}"
                   + (f" -- {r['error']}" if 'error' in r else ''))
    if r['kind'] == 'note':
      lines.append(f"- {r['text']}")
  return '\n'.join(lines) + '\n'


def hlo_and_kernel_tables(rows: list[dict]) -> list[str]:
  """Markdown of the hlo_report rows (one per variant) and of the kernels part's rows."""
  lines = ['', '| compiled step (hlo_report) | matmul calls | epilogues ("epilogue" found) | '
           'activations written | bf16/f32 converts | layout ops at attention |',
           '|---|---|---|---|---|---|']
  for r in rows:
    if r['kind'] == 'hlo':
      variant = ', '.join(f'{k}={v}' for k, v in r['row'].items() if k not in ('tuning', 'dtype'))
      written = ', '.join(f"{t} {w['count']} ({w['mib']} MiB)"
                          for t, w in r['activations_written'].items())
      around = r['layout_ops_around_attention']
      lines.append(f"| {variant} | {r['gemms']} | {r['epilogues']} ({r['epilogue_mentions']}) | "
                   f"{written} | {r['converts']} | {around['count']} ({around['mib']} MiB) |")
  lines += ['', '| MLP branch alone (mlp_kernels.py) | tiles | ms | output rel. err | '
            'dx rel. err |', '|---|---|---|---|---|']
  for r in rows:
    if r['kind'] == 'kernel':
      lines.append(f"| {r['impl']} {r['shape']} | {r['tiles'] or ''} | "
                   f"{r.get('ms', r.get('error', ''))} | {r.get('out_rel_err', '')} | "
                   f"{r.get('dx_rel_err', '')} |")
  return lines + ['']


def drive(plan, out, budget_s, flags, parts):
  """Runs `parts` in their own processes within the budget (shared in the plan's
  proportions) and writes the report."""
  os.makedirs(out, exist_ok=True)
  rows_path = os.path.join(out, ROWS_FILE)
  if os.path.exists(rows_path):
    os.remove(rows_path)
  start = time.time()
  shares = {p: share for p, share in plan.shares.items() if p in parts}
  for part, share in shares.items():
    last = part == list(shares)[-1]
    limit = budget_s - (time.time() - start) if last else budget_s * share / sum(shares.values())
    args = [sys.executable, __file__, f'--part={part}', f'--out={out}',
            f'--deadline={time.time() + limit * 0.9}', *flags]
    env = dict(os.environ)
    if part in ('jax', 'variants', 'flags', 'kernels'):  # the max batch wants ~all the memory
      env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
    elif part == 'profile':  # kernels inside a CUDA graph would report the graph's name
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_gpu_enable_command_buffer=').strip()
    else:  # JAX must not take the GPU from PyTorch
      env['JAX_PLATFORMS'] = 'cpu'
    try:
      code = subprocess.run(args, timeout=max(limit, 10), env=env, check=False).returncode
      if code:
        emit(out, dict(kind='note', text=f'part {part} exited with status {code}.'))
    except subprocess.TimeoutExpired:
      emit(out, dict(kind='note', text=f'part {part} was stopped at its {limit:.0f} s limit.'))
  rows = read_rows(out)
  with open(os.path.join(out, 'gpu_check.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  report = markdown(rows)
  with open(os.path.join(out, 'gpu_check.md'), 'w') as f:
    f.write(report)
  print(report)
  print(f'gpu_check: {time.time() - start:.0f} s, {len(rows)} rows in {out}')


PARTS = {'flops': flops_part, 'jax': jax_part, 'variants': variants_part, 'flags': flags_part,
         'kernels': kernels_part, 'profile': profile_part, 'torch': torch_part,
         'pipeline': pipeline_part}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='gpu_check_out', help='folder for the JSON and markdown')
  parser.add_argument('--budget_s', type=float, default=450)
  parser.add_argument('--quick', action='store_true',
                      help='the last minutes of a lease: the headline step as configured, '
                           'timed and profiled (use with --parts variants,profile)')
  parser.add_argument('--cpu_smoke', action='store_true',
                      help='the same code paths on a tiny model (the test suite runs this)')
  parser.add_argument('--fusion', action='store_true',
                      help='bf16 batch 128 only (issue #31): with --parts flops,variants,flags,'
                           'kernels,profile,torch')
  parser.add_argument('--parts', default=','.join(PARTS),
                      help=f'comma-separated, in their fixed order: {",".join(PARTS)}')
  parser.add_argument('--part', choices=(*PARTS, 'torch_compile', 'flag_variant'),
                      help=argparse.SUPPRESS)
  parser.add_argument('--deadline', type=float, help=argparse.SUPPRESS)
  parser.add_argument('--row', help=argparse.SUPPRESS)
  args = parser.parse_args()
  plan = SMOKE if args.cpu_smoke else FUSION if args.fusion else FULL
  if args.quick:
    plan = dataclasses.replace(plan, variants=plan.variants[:1], profiles=plan.profiles[:1],
                               flag_variants=(), check_attention=False)
  if args.part == 'torch_compile':
    torch_compile_part(plan, args.out, json.loads(args.row))
  elif args.part == 'flag_variant':
    with kernel_mode(plan):
      flag_variant_part(plan, args.out, json.loads(args.row), args.deadline)
  elif args.part:
    with kernel_mode(plan):  # (threads enter it themselves: prepare_all, attention_check)
      PARTS[args.part](plan, args.out, args.deadline)
  else:
    parts = args.parts.split(',')
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
      parser.error(f'--parts: unknown {", ".join(unknown)}; choose from {",".join(PARTS)}')
    flags = [f for f, on in (('--cpu_smoke', args.cpu_smoke), ('--quick', args.quick),
                             ('--fusion', args.fusion)) if on]
    drive(plan, args.out, args.budget_s, flags, parts)


if __name__ == '__main__':
  main()
