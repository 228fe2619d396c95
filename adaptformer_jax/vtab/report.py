"""results.json, report.md and report.png of a VTAB root, from whatever runs finished.

Both averages the literature uses, labelled: the mean over the 19 tasks (V-PETL Bench's
'Mean') and the mean of the three group means (natural 7, specialized 4, structured 8
tasks), which weighs the 8 structured tasks like the 4 specialized ones.
"""
import glob
import json
import os
import statistics
from collections.abc import Sequence

from adaptformer_jax import files
from adaptformer_jax.data import vtab as tasks
from adaptformer_jax.vtab import references

# The files of a VTAB root that the runner writes and the report reads.
RESULT = 'result.json'      # <root>/<task>/<run>/, once the run is evaluated
PROTOCOL = 'protocol.json'  # <root>/, what every run of the root shares


def averages(top1: dict[str, float]) -> dict[str, float | None]:
  """Per-group means, the 19-task mean and the mean of group means of {task: top-1};
  None where a task of it is missing."""
  out = {}
  for group in tasks.GROUPS:
    names = [t.name for t in tasks.TASKS if t.group == group]
    out[group] = (statistics.fmean(top1[n] for n in names)
                  if all(n in top1 for n in names) else None)
  complete = all(t.name in top1 for t in tasks.TASKS)
  out['mean_19_tasks'] = statistics.fmean(top1[t.name] for t in tasks.TASKS) if complete else None
  out['mean_of_group_means'] = (statistics.fmean(out[g] for g in tasks.GROUPS)
                                if complete else None)
  return out


def reference_rows() -> dict[str, dict[str, float]]:
  """{method: {task: top-1 %}} of the cited published rows."""
  return {m: dict(zip((t.name for t in tasks.TASKS), row))
          for m, row in references.V_PETL.items()}


def collect(root: str) -> dict:
  """Every finished run under `root`, per task: seeds, mean, std, the chosen point."""
  protocol = files.read_json(os.path.join(root, PROTOCOL)) or {}
  per_task = {}
  for t in tasks.TASKS:
    runs = [files.read_json(p)
            for p in sorted(glob.glob(os.path.join(root, t.name, '*', RESULT)))]
    finals = sorted((r for r in runs if r['stage'] == 'final'), key=lambda r: r['seed'])
    if not finals:
      continue
    scores = [100 * r['top1'] for r in finals]
    per_task[t.name] = dict(
        group=t.group, seeds=[r['seed'] for r in finals], top1=scores,
        mean=statistics.fmean(scores),
        std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
        chosen=finals[0]['hparams'],
        selection=[dict(hparams=r['hparams'], val200_top1=100 * r['top1'])
                   for r in runs if r['stage'] == 'select'],
        trainable_params=finals[0]['trainable_params'], total_params=finals[0]['total_params'],
        normalization=finals[0]['normalization'])
  means = averages({n: r['mean'] for n, r in per_task.items()})
  return dict(protocol=protocol, tasks=per_task, averages=means,
              references=dict(source=references.CITATION, rows=reference_rows()))


def write(root: str) -> dict:
  """Writes results.json, report.md and report.png under `root`; returns the results."""
  results = collect(root)
  files.write_atomic(os.path.join(root, 'results.json'), json.dumps(results, indent=1))
  files.write_atomic(os.path.join(root, 'report.md'), markdown(results))
  if results['tasks']:
    chart(results, os.path.join(root, 'report.png'))
  return results


def _fmt(value: float | None) -> str:
  return '–' if value is None else f'{value:.2f}'


def markdown(results: dict) -> str:
  """The report: per task (standard order), per group, and both labelled averages."""
  p, rows = results['protocol'], results['tasks']
  method = p.get('method', '?')
  ref = reference_rows().get(method)
  lines = [f"# VTAB-1k: {method} on {p.get('backbone', '?')}", '',
           f"Backbone weights: `{p.get('init_from') or '(random init)'}` (representation layer "
           f"{'dropped' if not p.get('pre_logits') else 'kept'}); normalisation "
           f"`{p.get('normalization')}`; {p.get('image_size')} px direct resize, no augmentation; "
           f"{p.get('optimizer')} batch {p.get('batch_size')}, {p.get('num_epochs')} epochs "
           f"({p.get('warmup_epochs')} warmup), cosine. Hyperparameters chosen on val200 "
           f"(trained on train800) over {p.get('grid')}"
           + (f" or fixed by {p['hparams_file']}" if p.get('hparams_file') else '')
           + '; then train800val200, one test evaluation after the last step, seeds '
           f"{p.get('seeds')}.", '',
           '| task | group | top-1 (mean ± std) | seeds | chosen lr, wd | trainable |'
           + (' V-PETL |' if ref else ''),
           '|---|---|---|---|---|---|' + ('---|' if ref else '')]
  for t in tasks.TASKS:
    r = rows.get(t.name)
    if r is None:
      lines.append(f'| {t.name} | {t.group} | not run | | | |' + (' |' if ref else ''))
      continue
    lines.append(
        f"| {t.name} | {t.group} | {r['mean']:.2f} ± {r['std']:.2f} | "
        f"{', '.join(f'{s:.1f}' for s in r['top1'])} | {r['chosen']['learning_rate']:g}, "
        f"{r['chosen']['weight_decay']:g} | {r['trainable_params']:,} |"
        + (f' {ref[t.name]:.1f} |' if ref else ''))
  a = results['averages']
  ref_a = averages(ref) if ref else {}
  lines += ['', '| average | this run |' + (' V-PETL |' if ref else ''),
            '|---|---|' + ('---|' if ref else '')]
  labels = [(g, f'{g} (mean of its {sum(t.group == g for t in tasks.TASKS)} tasks)')
            for g in tasks.GROUPS] + [
                ('mean_19_tasks', "**mean over the 19 tasks** (V-PETL Bench's Mean)"),
                ('mean_of_group_means', '**mean of the 3 group means**')]
  for key, label in labels:
    lines.append(f'| {label} | {_fmt(a[key])} |' + (f' {_fmt(ref_a[key])} |' if ref else ''))
  lines += ['', f"Reference rows: {results['references']['source']}. "
            'An average over incomplete groups is left out (–).', '']
  return '\n'.join(lines)


def chart(results: dict, path: str, methods: Sequence[str] = tuple(references.V_PETL)) -> None:
  """Per-task top-1 of this run (mean ± std over seeds) beside the published rows."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  names = [t.name for t in tasks.TASKS]
  rows = reference_rows()
  width = 0.8 / (len(methods) + 1)
  fig, ax = pyplot.subplots(figsize=(16, 5))
  for k, m in enumerate(methods):
    ax.bar([i + k * width for i in range(len(names))], [rows[m][n] for n in names], width,
           label=f'{m} (V-PETL Bench)', alpha=0.45)
  ours = results['tasks']
  xs = [i + len(methods) * width for i, n in enumerate(names) if n in ours]
  ax.bar(xs, [ours[n]['mean'] for n in names if n in ours], width, color='black',
         yerr=[ours[n]['std'] for n in names if n in ours],
         label=f"{results['protocol'].get('method', 'this run')} (this run)")
  ax.set_xticks([i + 0.4 for i in range(len(names))], names, rotation=45, ha='right')
  ax.set_ylabel('top-1 (%)')
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8, ncol=3)
  ax.set_title('VTAB-1k per task; references: ' + references.CITATION.split(':')[0])
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=90)
  pyplot.close(fig)
  os.replace(path + '.tmp.png', path)
