"""The canary audit's attacks and their measures (bnsynth_jax/canary.py documents the
audit; canary_audit.py runs it): online LiRA in its variants, the strongest per target, and
the one-run lower bound on the replace-one epsilon."""

from __future__ import annotations

import numpy as np

FPRS = (0.01, 0.001)


# LiRA's variance choices and their attacks' name suffixes.
VARIANCES = {'': 'pooled', '_per_canary_variance': 'per_canary',
             '_shrunk_variance': 'shrunk'}


def lira_scores(scores: np.ndarray, design: np.ndarray, variance: str = 'pooled') -> np.ndarray:
  """Online LiRA, leave-one-run-out: [M, K] log-likelihood ratios log N(s; mu_in_k, sd_in) -
  log N(s; mu_out_k, sd_out) of each run's score, with per-canary IN and OUT means from the
  other runs. `variance`: 'pooled' -- one IN and one OUT variance over every canary (the
  fixed-variance LiRA, robust with few shadows); 'per_canary' -- each canary's own variance,
  its IN and OUT deviations pooled (as the LiRA paper's online attack with enough shadows;
  a canary with fewer than 2 IN or 2 OUT runs falls back to the pooled one); 'shrunk' --
  each canary's own averaged with the pool's (`_per_canary_sd`)."""
  m_runs = scores.shape[0]
  out = np.zeros_like(scores, dtype=np.float64)
  for m in range(m_runs):
    others = np.arange(m_runs) != m
    out[m] = lira_log_ratio(scores[m], lira_fit(scores[others], design[others], variance))
  return out


def lira_fit(scores: np.ndarray, member: np.ndarray, variance: str = 'pooled') -> tuple:
  """Per-canary IN and OUT Gaussians (mu_in, sd_in, mu_out, sd_out; each [K]) fitted on
  reference runs' scores [R, K] and their known membership [R, K]."""
  stats = []
  for is_in in (True, False):
    w = member == is_in
    n = np.maximum(w.sum(0), 1)
    mu = (scores * w).sum(0) / n
    var = ((scores - mu) ** 2 * w).sum() / max(w.sum() - w.shape[1], 1)
    stats.append((mu, np.full(scores.shape[1], np.sqrt(max(var, 1e-12))), w))
  (mu_in, sd_in, w_in), (mu_out, sd_out, w_out) = stats
  if variance in ('per_canary', 'shrunk'):
    sd_in, sd_out = _per_canary_sd(scores, mu_in, mu_out, w_in, w_out, sd_in, sd_out,
                                   shrink=variance == 'shrunk')
  elif variance != 'pooled':
    raise ValueError(f'unknown LiRA variance {variance!r}')
  return mu_in, sd_in, mu_out, sd_out


def lira_log_ratio(s: np.ndarray, fit: tuple) -> np.ndarray:
  mu_in, sd_in, mu_out, sd_out = fit
  return (-0.5 * ((s - mu_in) / sd_in) ** 2 - np.log(sd_in)
          + 0.5 * ((s - mu_out) / sd_out) ** 2 + np.log(sd_out))


def _per_canary_sd(scores, mu_in, mu_out, w_in, w_out, pooled_in, pooled_out,
                   shrink: bool = False):
  """Each canary's standard deviation, its IN and OUT squared deviations pooled (the same
  for both hypotheses); the pooled ones where a canary has too few runs of either kind.
  With `shrink`, each canary's variance is averaged half and half with the variance
  pooled over all canaries (an estimate from ~14 runs is noisy, and a too small one makes
  the likelihood ratio of an OUT run extreme: the false positives that decide TPR at low
  FPR)."""
  n_in, n_out = w_in.sum(0), w_out.sum(0)
  squares = ((scores - mu_in) ** 2 * w_in).sum(0) + ((scores - mu_out) ** 2 * w_out).sum(0)
  dof = np.maximum(n_in + n_out - 2, 1)
  var = np.maximum(squares / dof, 1e-12)
  if shrink:
    var = 0.5 * var + 0.5 * max(squares.sum() / max(dof.sum(), 1), 1e-12)
  sd = np.sqrt(var)
  enough = (n_in >= 2) & (n_out >= 2)
  return np.where(enough, sd, pooled_in), np.where(enough, sd, pooled_out)


# The attacks the one-run lower bound tries, fixed before any audit is scored (LiRA
# variance, query statistic): the shrunk and pooled variances, since each fit sees only
# half the runs.
ONE_RUN_ATTACKS = {'lira': ('pooled', 'plain'), 'lira_mean_query': ('pooled', 'mean'),
                   'lira_mean_query_shrunk_variance': ('shrunk', 'mean')}
ONE_RUN_METHOD = (
    'one-run audit (Steinke, Nasr, Jagielski 2023; jax_privacy.auditing epsilon_one_run): '
    'the (run, canary) bits are independent fair coins and IN/OUT differ by replacing one '
    'record, so the bound is on the replace-one epsilon the guarantee states; the runs are '
    'split into two folds (even, odd), each attacked with Gaussians fitted on the other '
    'fold only (its guesses never see its own bits), Bonferroni over folds and attacks')


def cross_fitted_lira(s: np.ndarray, design: np.ndarray, variance: str) -> np.ndarray:
  """[M, K] LiRA log-ratios where the runs of each fold (even, odd) are scored by Gaussians
  fitted on the other fold alone: a run's scores never depend on its own fold's bits."""
  folds = np.arange(design.shape[0]) % 2 == 0
  out = np.zeros(s.shape, np.float64)
  for target in (folds, ~folds):
    out[target] = lira_log_ratio(s[target], lira_fit(s[~target], design[~target], variance))
  return out


def one_run_lower_bound(scores: np.ndarray, design: np.ndarray, significance: float = 0.05,
                        delta: float = 1e-5) -> dict:
  """A lower bound on the replace-one epsilon that holds with probability 1 - significance
  (`ONE_RUN_METHOD`), for an audit with adjacency 'replace' and an independent design:
  the largest over ONE_RUN_ATTACKS x 2 folds, each at significance / (their number)."""
  from jax_privacy import auditing
  folds = np.arange(design.shape[0]) % 2 == 0
  tests = []
  for name, (variance, query) in ONE_RUN_ATTACKS.items():
    s = scores if scores.ndim == 2 else (scores.mean(-1) if query == 'mean' else scores[..., 0])
    llr = cross_fitted_lira(s, design, variance)
    for fold, target in enumerate((folds, ~folds)):
      tests.append((name, fold, llr[target][design[target]], llr[target][~design[target]]))
  alpha = significance / len(tests)
  value, name, fold = max(
      (float(auditing.CanaryScoreAuditor(i, o).epsilon_one_run(alpha, delta)), name, fold)
      for name, fold, i, o in tests)
  return {'value': value, 'attack': name, 'fold': fold, 'confidence': 1 - significance,
          'delta': delta, 'tests': len(tests), 'method': ONE_RUN_METHOD}


def attack_measures(in_scores, out_scores, bootstrap: int, seed: int) -> dict:
  """AUC and TPR at FPRS (jax_privacy.auditing), each with a bootstrap 95% interval."""
  from jax_privacy import auditing
  auditor = auditing.CanaryScoreAuditor(np.asarray(in_scores), np.asarray(out_scores))
  params = (auditing.BootstrapParams(num_samples=bootstrap, quantiles=(0.025, 0.975),
                                     seed=seed) if bootstrap else None)

  def with_interval(value, fn):
    out = {'value': float(value)}
    if params is not None:
      lo, hi = np.asarray(fn(params), np.float64)
      out['ci95'] = [float(lo), float(hi)]
    return out

  result = {'auc': with_interval(auditor.attack_auroc(),
                                 lambda p: auditor.attack_auroc(bootstrap_params=p))}
  for fpr in FPRS:
    result[f'tpr_at_{fpr:g}_fpr'] = with_interval(
        auditor.tpr_at_given_fpr(fpr),
        lambda p, fpr=fpr: auditor.tpr_at_given_fpr(fpr, bootstrap_params=p))
  # A statistically valid lower bound on epsilon (Clopper-Pearson, 95%, Bonferroni over
  # thresholds): a DP run's must stay below its guarantee.
  result['epsilon_lower_bound_95'] = float(auditor.epsilon_clopper_pearson(0.05, delta=1e-5))
  result['num_in'], result['num_out'] = int(np.size(in_scores)), int(np.size(out_scores))
  return result


def roc_curve(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
  scores = np.concatenate([in_scores, out_scores])
  member = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
  order = np.argsort(-scores, kind='stable')
  tpr = np.concatenate([[0], np.cumsum(member[order]) / max(len(in_scores), 1)])
  fpr = np.concatenate([[0], np.cumsum(1 - member[order]) / max(len(out_scores), 1)])
  return fpr, tpr


def augmented_lira_scores(scores: np.ndarray, design: np.ndarray, variance: str) -> np.ndarray:
  """LiRA over several queries per canary ([M, K, A] scores: flips and shifts): each
  query's log-likelihood ratio, averaged over the queries (as the LiRA paper's attack)."""
  return np.mean([lira_scores(scores[..., a], design, variance)
                  for a in range(scores.shape[-1])], axis=0)


def multivariate_lira_scores(scores: np.ndarray, design: np.ndarray,
                             per_canary_scale: bool = False) -> np.ndarray:
  """LiRA on all the queries of a canary at once ([M, K, A] scores -> [M, K]): per canary
  the IN and OUT mean vectors over the other runs, one covariance of the queries pooled
  over every (other run, canary) residual -- the queries of one canary (shifted views)
  are strongly correlated, which averaging their ratios as if independent ignores -- and
  the log-likelihood ratio of two Gaussians with that covariance, the linear discriminant
  d' C^-1 (s - (mu_in + mu_out) / 2), d = mu_in - mu_out. With `per_canary_scale`, each
  canary's covariance is the pooled one times its own residual scale (its mean squared
  Mahalanobis residual per query), shrunk half-way to 1 as `_per_canary_sd`."""
  m_runs, k, a = scores.shape
  out = np.zeros((m_runs, k))
  for m in range(m_runs):
    others = np.arange(m_runs) != m
    w_in = (design & others[:, None])[..., None]
    w_out = (~design & others[:, None])[..., None]
    mu_in = (scores * w_in).sum(0) / np.maximum(w_in.sum(0), 1)
    mu_out = (scores * w_out).sum(0) / np.maximum(w_out.sum(0), 1)
    resid = np.where(design[..., None], scores - mu_in, scores - mu_out)[others]  # [M-1, K, A]
    dof = max(resid.shape[0] * k - 2 * k, 1)
    cov = np.einsum('rka,rkb->ab', resid, resid) / dof
    cov += np.eye(a) * max(1e-9, 1e-6 * np.trace(cov) / a)
    inv = np.linalg.inv(cov)
    scale = np.ones(k)
    if per_canary_scale:
      own = np.einsum('rka,ab,rkb->k', resid, inv, resid) / (a * max(resid.shape[0] - 2, 1))
      scale = 0.5 * own + 0.5
    d = mu_in - mu_out
    out[m] = np.einsum('ka,ab,kb->k', d, inv, scores[m] - 0.5 * (mu_in + mu_out)) / scale
  return out


def attack_scores(s: np.ndarray, design: np.ndarray) -> dict[str, np.ndarray]:
  """{attack: [M, K] scores} of one target's [M, K] or [M, K, A] scores: LiRA with a pooled,
  a per-canary and a shrunk per-canary variance, the global threshold, and for [M, K, A]
  scores (several queries per canary, `augmented_queries`) LiRA on the first (plain) query,
  over all of them (the likelihood ratios averaged), on their mean score, and on their
  vector (`multivariate_lira_scores`)."""
  plain = s[..., 0] if s.ndim == 3 else s
  attacks = {}
  for suffix, variance in VARIANCES.items():
    attacks['lira' + suffix] = lira_scores(plain, design, variance)
    if s.ndim == 3:
      attacks['lira_augmented' + suffix] = augmented_lira_scores(s, design, variance)
      # The queries' scores averaged first (one less noisy statistic per canary), then LiRA.
      attacks['lira_mean_query' + suffix] = lira_scores(s.mean(-1), design, variance)
  if s.ndim == 3 and s.shape[-1] > 1:
    attacks['lira_multivariate'] = multivariate_lira_scores(s, design)
    attacks['lira_multivariate_per_canary_scale'] = multivariate_lira_scores(
        s, design, per_canary_scale=True)
  attacks['threshold'] = plain
  return attacks


def _strongest(measures: dict) -> str:
  return max(measures, key=lambda name: (measures[name]['tpr_at_0.001_fpr']['value'],
                                         measures[name]['auc']['value']))


def evaluate_attacks(scores: dict[str, np.ndarray], design: np.ndarray, bootstrap: int,
                     seed: int) -> dict:
  """{target: {attack: measures}} over every (run, canary) pair for each of
  `attack_scores`, then 'strongest', the attack of the highest TPR at 0.1% FPR (ties:
  AUC)."""
  results = {}
  for target, s in scores.items():
    results[target] = {name: attack_measures(a[design], a[~design], bootstrap, seed)
                       for name, a in attack_scores(s, design).items()}
    best = _strongest(results[target])
    results[target]['strongest'] = {**results[target][best], 'attack': best}
  return results


def permutation_null(scores: dict[str, np.ndarray], design: np.ndarray, permutations: int,
                     bootstrap: int, seed: int, observed: dict) -> dict:
  """The audit with membership unlinked from the scores: each canary's IN/OUT bits shuffled
  across the runs (`permutations` times; the per-canary IN count kept; the scores as they
  are, so a real leak stays in them as variance), every attack refitted and the strongest
  chosen exactly as `evaluate_attacks` does -- so the choice of the best of many attacks is
  part of the null, and the p-value is an exact randomization test of "the scores do not
  depend on membership". Per target: the null's median and 95th percentile of the strongest
  attack's TPR at 0.1% FPR and of the upper end of its bootstrap interval, the share of
  permutations whose upper end exceeds 1%, and the permutation p-value of the observed TPR
  (`observed`: evaluate_attacks' result), (1 + #{null >= observed}) / (1 + permutations)."""
  from jax_privacy import auditing
  rng = np.random.default_rng([seed, 2718])
  null = {t: {'tpr': [], 'upper': []} for t in scores}
  params = (auditing.BootstrapParams(num_samples=bootstrap, quantiles=(0.025, 0.975),
                                     seed=seed) if bootstrap else None)
  for _ in range(permutations):
    shuffled = rng.permuted(design, axis=0)
    for target, s in scores.items():
      attacks = attack_scores(s, shuffled)
      measures = {name: _point_measures(a[shuffled], a[~shuffled])
                  for name, a in attacks.items()}
      name = _strongest(measures)
      null[target]['tpr'].append(measures[name]['tpr_at_0.001_fpr']['value'])
      if params is not None:
        best = auditing.CanaryScoreAuditor(attacks[name][shuffled], attacks[name][~shuffled])
        null[target]['upper'].append(float(np.asarray(
            best.tpr_at_given_fpr(0.001, bootstrap_params=params))[1]))
  return {t: _null_summary(np.array(v['tpr']), np.array(v['upper']),
                           observed[t]['strongest']['tpr_at_0.001_fpr']['value'])
          for t, v in null.items()}


def _point_measures(in_scores, out_scores) -> dict:
  """AUC and TPR at 0.1% FPR without intervals: what `_strongest` reads."""
  from jax_privacy import auditing
  auditor = auditing.CanaryScoreAuditor(np.asarray(in_scores), np.asarray(out_scores))
  return {'auc': {'value': float(auditor.attack_auroc())},
          'tpr_at_0.001_fpr': {'value': float(auditor.tpr_at_given_fpr(0.001))}}


def _null_summary(tpr: np.ndarray, upper: np.ndarray, observed: float) -> dict:
  """The null's quantiles; without bootstrap intervals (`upper` empty), those of TPR only."""
  summary = {'permutations': int(len(tpr)),
             'tpr_median': float(np.median(tpr)), 'tpr_95th': float(np.quantile(tpr, 0.95)),
             'p_value': float((1 + np.sum(tpr >= observed)) / (1 + len(tpr)))}
  if len(upper):
    summary.update(upper_median=float(np.median(upper)),
                   upper_95th=float(np.quantile(upper, 0.95)),
                   share_upper_above_1pct=float(np.mean(upper > 0.01)))
  return summary
