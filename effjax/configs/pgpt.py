"""p-gpt (ParallelGPT, arXiv 2404.14462): two parallel decoders of L/2 blocks, mixed by softmax-normalised learned
weights; any subset of branches can run at inference (`--config.model.pgpt.active_branches='(0,)'` = "p-gpt-1").

Presets:
  tiny       2 branches x 1 block, 64 wide, char tokens, ctx 32: tests and smoke runs (seconds).
  (default)  the paper's architecture at CPU scale: 2 branches x 2 blocks, d 192 (a 384-wide split
             embedding), 6 heads, post-LN, final norm after the mix, untied head with bias, char tokens on the
             embedded corpus, ctx 128; a few CPU minutes.
  project    the default with the later form of the seed's formula: one shared d-wide embedding and a d×d
             projection P_i per branch (instead of the split embedding).
  paper      exactly the study's p-gpt: 9,734,982 params (9.73 M); one active branch uses 6,186,054
             (6.19 M, 23.60 MB), reported as `single_branch_params` / `single_branch_param_mb`.
  paper_1    the same network with active_branches=(0,): `active_params` = 6,186,054 (p-gpt-1).
  published  the architecture of the authors' paper-era code (checked: experiments/REPORT.md): no norm after the mix and
             one scalar mixing weight (y = w·y_0 + (1-w)·y_1): 9,734,213 params, 6,185,285 for one branch
             (23.59 MB). Its p-gpt-1 keeps the branch whose trained weight is >= 0.5, scaled by that weight
             (`--config.model.pgpt.active_branches='(I,)'` with I = parallel.strongest_branch(params)).
  published_1  the same with active_branches=(0,).
The default (and `paper`) keep the softmax mix and the final norm: with one LayerNorm after the mix, the
one-branch network is a complete GPT (renormalised weight 1), so p-gpt-1 needs no retraining or rescaling, and
the paper's 23.60 MB / 9.73 M are matched; `published` is there to compare against the authors' code.

How the paper's numbers pin the architecture down (the baseline GPT, configs/gpt.py:paper_pgpt_baseline, is
8,823,364: 4 post-LN blocks of 1,774,464 with d=384, V=2116, ctx 256; MB = params·4/2^20):
  * the 'split' form: one token table V×2d (1,625,088) and one position table 256×2d (196,608), cut
    channel-wise into two d-wide halves, one per branch — as in the study's public code. The 'project' form
    gives 9.12 M total / 5.42 M for one branch, which matches neither number.
  * ONE shared head d→V with bias (814,660) reading the mixed d-wide output: a head per branch would make the
    total 10.55 M (the one-branch count is 6.19 M either way, so it is the total that decides).
  * ONE final LayerNorm (768) after the mix. 23.60 MB needs at least 6,185,288 params; without a final norm
    one branch is 1,821,696 + 2·1,774,464 + 814,660 + 2 = 6,185,286 → 23.59 MB. With it: 6,186,054 → 23.60 MB.
    A final norm per branch would also give 23.60 MB but a 9,735,750 (9.74 M) total, not ~9.73 M.
  * biases everywhere, post-LN blocks with two LayerNorms each, learned positions, dropout 0.1.
  * mixing: softmax over P learned logits (2 params; the code used one scalar w and 1-w — the same mixtures,
    one param fewer, which changes no rounded number). p-gpt-1 counts the whole P·d-wide embedding, as the
    paper did (`active_params_sliced_embedding` also drops the inactive branch's columns: 5.27 M).
  * p-gpt-1 here renormalises the mixing weights over the active branch (weight 1); the study's code scaled
    the surviving branch by its trained weight (~0.5), which is part of why its p-gpt-1 loss was so high.
"""

from effjax.configs import base, presets


def paper_architecture(c):
  """The study's p-gpt around the 4-block post-LN baseline: split embedding, one final norm, one untied head."""
  presets.pgpt_baseline(c)
  c.model.update(family='pgpt', final_norm=True)
  c.model.pgpt.update(num_branches=2, branch_input='split', active_branches=())
  return c


def get_config(preset: str = ''):
  c = presets.study_cpu_scale(paper_architecture(base.get_base()))
  if preset == 'tiny':
    presets.tiny(c, train=dict(lr=3e-3))
  elif preset == 'project':
    c.model.pgpt.branch_input = 'project'
  elif preset in ('paper', 'paper_1', 'published', 'published_1'):
    paper_architecture(c)
    if preset.startswith('published'):
      c.model.final_norm = False
      c.model.pgpt.branch_mix = 'scalar'
    if preset.endswith('_1'):
      c.model.pgpt.active_branches = (0,)
  elif preset:
    base.unknown_preset('pgpt', preset, ['tiny', 'project', 'paper', 'paper_1', 'published', 'published_1'])
  return c
