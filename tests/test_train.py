"""The training loop: checkpoint compatibility, the files a run writes, divergence and the CLI modes (exact resume and
1 device == 8 devices: tests/test_contract.py, for every family)."""

import json
import os

import numpy as np
import pytest

from effjax import checkpoint, metrics, train
from effjax.errors import EffjaxError
from tests.helpers import one_device, run_cli, tiny_config, train_losses


def test_a_checkpoint_resumes_after_a_new_model_key_is_added(tmp_path, corpus_dir):
  """Compatibility is checked over the keys families and kinds declare as shaping the parameters, so a key added
  to the config after a checkpoint was written (here: in this test) does not make that checkpoint foreign."""
  workdir = str(tmp_path / 'run')
  overrides = {'train.steps': 8, 'train.log_every': 1, 'checkpoint.every': 4}
  train.train_and_evaluate(
    tiny_config(corpus_dir, **overrides, **{'train.stop_at': 4}), workdir, devices=one_device(), progress=False
  )
  newer = tiny_config(corpus_dir, **overrides)
  newer.model.added_after_the_checkpoint = 3
  assert 'added_after_the_checkpoint' not in checkpoint.architecture(newer.model)
  assert not {'dropout', 'remat', 'dtype', 'scan_unroll'} & set(checkpoint.architecture(newer.model))
  train.train_and_evaluate(newer, workdir, devices=one_device(), progress=False)
  assert sorted(train_losses(workdir)) == list(range(1, 9))
  assert checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3, read_only=True).latest_step() == 8


def test_run_writes_documented_files(tmp_path, corpus_dir):
  workdir = tmp_path / 'run'
  result = train.train_and_evaluate(
    tiny_config(corpus_dir, **{'train.steps': 10, 'train.eval_every': 5, 'train.log_every': 5}), str(workdir)
  )
  assert {'loss', 'ppl', 'bpb'} <= set(result)
  for name in ('config.json', 'metrics.jsonl', 'summary.json', 'tb', 'checkpoints', 'data/tokenizer.json'):
    assert (workdir / name).exists(), name
  lines = metrics.read_metrics(workdir)
  train_lines = [m for m in lines if m['split'] == 'train']
  eval_lines = [m for m in lines if m['split'] == 'eval']
  assert [m['step'] for m in train_lines] == [5, 10] and [m['step'] for m in eval_lines] == [5, 10]
  assert all({'loss', 'lr', 'tokens_per_sec', 'tokens_seen'} <= set(m) for m in train_lines)
  assert all({'loss', 'ppl'} <= set(m) for m in eval_lines)
  assert train_lines[-1]['tokens_seen'] == 10 * 8 * 32
  assert np.isclose(eval_lines[-1]['ppl'], np.exp(eval_lines[-1]['loss']))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tb'))
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['total_params'] == summary['trainable_params'] > 0
  assert json.loads((workdir / 'config.json').read_text())['model']['vocab_size'] > 0


def test_step_clock_waits_for_the_steps_and_evaluation_compiles_once(tmp_path, corpus_dir, monkeypatch):
  """Steps are dispatched ahead of the host. The clock that times them (tokens/s, MFU) must stop only after the
  dispatched steps have run; before this was checked it stopped at dispatch and logged MFU of 150-1000 %. And the
  loop's evaluation step is built once: a new jitted function per evaluation recompiled it every time."""
  outputs, built = [], []
  make_train_step, make_eval_step, pause = train.make_train_step, train.make_eval_step, metrics.StepClock.pause

  def recording_train_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def run(state, batch):
      new_state, step_metrics = step(state, batch)
      outputs.append(step_metrics['loss'])
      return new_state, step_metrics

    return run

  def checked_pause(clock):
    assert all(loss.is_ready() for loss in outputs), 'the clock stopped before the dispatched steps ran'
    pause(clock)

  monkeypatch.setattr(train, 'make_train_step', recording_train_step)
  monkeypatch.setattr(train, 'make_eval_step', lambda setup: built.append(setup) or make_eval_step(setup))
  monkeypatch.setattr(metrics.StepClock, 'pause', checked_pause)
  overrides = {'train.steps': 12, 'train.eval_every': 3, 'train.log_every': 3}
  train.train_and_evaluate(tiny_config(corpus_dir, **overrides), str(tmp_path / 'run'), progress=False)
  assert len(outputs) == 12 and len(built) == 1
  evals = [m for m in metrics.read_metrics(tmp_path / 'run') if m['split'] == 'eval']
  assert [m['step'] for m in evals] == [3, 6, 9, 12]


def test_loss_decreases_on_corpus(tmp_path, corpus_dir):
  train.train_and_evaluate(tiny_config(corpus_dir, **{'train.steps': 40, 'train.log_every': 10}), str(tmp_path / 'run'))
  losses = train_losses(tmp_path / 'run')
  assert losses[40] < losses[10] - 0.5, losses


def test_nan_loss_stops_with_step(tmp_path, corpus_dir):
  cfg = tiny_config(
    corpus_dir,
    **{
      'train.steps': 20,
      'train.lr': 1e6,
      'train.grad_clip': 0.0,
      'train.warmup_steps': 0,
      'train.log_every': 1,
      'checkpoint.every': 1,
    },
  )
  with pytest.raises(EffjaxError, match=r'loss became (nan|inf) at step \d+'):
    train.train_and_evaluate(cfg, str(tmp_path / 'run'))


@pytest.mark.slow
def test_cli_modes_on_tiny(tmp_path, corpus_dir):
  """train (with a CLI override), then summary, eval, sample and export of that run with --workdir alone (its own
  config.json), each through the real entry point."""
  workdir = str(tmp_path / 'run')
  result = run_cli(
    '--config=configs/gpt.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus_dir}',
    '--config.train.steps=12',
    '--config.model.num_layers=3',
    '--progress=false',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['train']['steps'] == 12 and config['model']['num_layers'] == 3
  assert max(train_losses(workdir)) == 12
  common = [f'--workdir={workdir}']
  result = run_cli(*common, '--mode=summary')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'trainable_params' in result.stdout
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['total_params'] == summary['trainable_params']
  result = run_cli(*common, '--mode=eval')
  assert result.returncode == 0, result.stderr[-2000:]
  assert {'loss', 'ppl', 'bpb'} <= set(json.load(open(os.path.join(workdir, 'eval.json'))))
  result = run_cli(*common, '--mode=sample', '--prompt=def ', '--max_new_tokens=20', '--temperature=0')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('def ') and len(result.stdout.rstrip('\n')) >= 5
  export_dir = str(tmp_path / 'export')
  result = run_cli(*common, '--mode=export', f'--export_dir={export_dir}')
  assert result.returncode == 0, result.stderr[-2000:]
  result = run_cli(
    f'--from_export={export_dir}', '--mode=sample', '--prompt=def ', '--max_new_tokens=20', '--temperature=0'
  )
  assert result.returncode == 0, result.stderr[-2000:]


def test_eval_sample_and_export_restore_the_params_only(tmp_path, corpus_dir):
  """modes.restore_trained (eval, sample, export) reads step, params and collections, not the Adam moments; the
  params equal those of a full train-state restore."""
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import modes, state as state_lib  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / 'run')
  config = tiny_config(corpus_dir, **{'train.steps': 4, 'checkpoint.every': 4})
  train.train_and_evaluate(config, workdir, devices=one_device(), progress=False)
  _, params_only, resolved, _, meta = modes.restore_trained(config, workdir)
  assert meta['step'] == 4 and int(params_only.step) == 4 and not jax.tree.leaves(params_only.opt_state)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3, read_only=True)
  full, _ = ckpt.restore(4, state_lib.make_setup(resolved).abstract_state)
  assert len(jax.tree.leaves(full.opt_state)) > 2 * len(jax.tree.leaves(full.params)) - 1
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(params_only.params)):
    np.testing.assert_array_equal(a, b)
