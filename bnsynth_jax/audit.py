"""Privacy audit: what does the synthetic set reveal about the private training images?

Visual privacy
  * For every synthetic image, its exact top-k nearest private training images
    under (a) pixel L2 and (b) cosine distance of the teacher's penultimate
    features: brute force, the training set sharded over devices inside
    `jax.shard_map` (local top-k, all-gather of the candidates, top-k again).
  * SSIM and PSNR (dm-pix, images in [0, 1]) between each synthetic image and its
    candidates; nn_ssim is the highest SSIM over the candidates of both metrics.
  * Distance to closest record (DCR, pixel L2 in [0, 1] units) for the synthetic
    images and, as the reference, for real held-out (test) images against the
    training set; how many synthetic images are closer than the 1st-percentile
    holdout DCR.
  * Pictures: the synthetic images most similar to a private image beside it,
    and a random sample beside their nearest private images.

Membership inference
  * Members: a fixed-seed sample of the teacher's training images; non-members:
    as many test images.
  * Targets: the synthetic-trained student, the teacher (the model that did see
    the data) and, as a contrast, the real-subset student on its own members.
  * Attacks: loss threshold; and, with audit.reference_models > 0, a calibrated
    per-example attack in the style of offline LiRA (Carlini et al. 2022): the
    target's logit-scaled confidence is compared with a Gaussian fitted to
    reference models trained on training data that excludes every audited
    example. The same reference models calibrate every target.
  * ROC AUC and TPR at 1% and 0.1% FPR, with bootstrap 95% intervals, and the
    ROC curves as audit/roc.png.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from bnsynth_jax import (artifacts, augment, evaluation, fileio, input_pipeline, metrics,
                         models, parallel, report, synthetic_data, train)
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import stage_dir, teacher_dir
from bnsynth_jax.sources import PrivateData



# ----------------------------------------------------------------------------
# Exact nearest neighbours, sharded


@functools.lru_cache(maxsize=8)
def _knn_fn(mesh, k: int, metric: str):
  axis = parallel.DATA_AXIS

  def local(queries, database, valid):
    # queries [q, D] (replicated), database [n_local, D], valid [n_local] (sharded).
    dots = jnp.einsum('qd,nd->qn', queries, database, precision=jax.lax.Precision.HIGHEST)
    if metric == 'l2':
      dist = (jnp.sum(jnp.square(queries), -1)[:, None] - 2.0 * dots +
              jnp.sum(jnp.square(database), -1)[None, :])
    else:  # cosine distance of unit vectors
      dist = 1.0 - dots
    dist = jnp.where(valid[None, :], dist, jnp.inf)
    kk = min(k, database.shape[0])
    neg, idx = jax.lax.top_k(-dist, kk)
    offset = jax.lax.axis_index(axis) * database.shape[0]
    cand_d = jax.lax.all_gather(-neg, axis, axis=1, tiled=True)
    cand_i = jax.lax.all_gather(idx + offset, axis, axis=1, tiled=True)
    neg, pick = jax.lax.top_k(-cand_d, k)
    return -neg, jnp.take_along_axis(cand_i, pick, axis=1)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                     out_specs=(P(), P()), check_vma=False)
  return jax.jit(fn)


class Database:
  """Rows (this process's share) as one global array sharded over every device.

  Global row g of the padded array is (process g // rows_per_process, local row
  g % rows_per_process); padding rows are never returned as neighbours.
  """

  def __init__(self, local_rows: np.ndarray, mesh):
    self.mesh = mesh
    local_devices = jax.local_device_count()
    count = len(local_rows)
    per_process = int(max(parallel.allgather_rows(np.asarray([count], np.int64))))
    per_process = -(-max(per_process, 1) // local_devices) * local_devices
    padded = np.zeros((per_process, local_rows.shape[1]), np.float32)
    padded[:count] = local_rows
    valid = np.zeros(per_process, bool)
    valid[:count] = True
    self.rows_per_process = per_process
    self.local_count = count
    self.array = parallel.to_global(mesh, padded)
    self.valid = parallel.to_global(mesh, valid)

  def search(self, queries: np.ndarray, k: int, metric: str, block: int = 256):
    """Exact top-k: (distances [Q, k], global row indices [Q, k]); cosine needs unit rows."""
    fn = _knn_fn(self.mesh, k, metric)
    dists, idx = [], []
    tick = metrics.progress(f'audit: nearest neighbours ({metric})', len(queries), 'queries')
    for start in range(0, len(queries), block):
      tick(start)
      q = queries[start:start + block]
      pad = block - len(q)
      if pad:
        q = np.concatenate([q, np.zeros((pad, q.shape[1]), q.dtype)])
      d, i = fn(parallel.replicate(self.mesh, q.astype(np.float32)), self.array, self.valid)
      d, i = parallel.to_host((d, i))
      dists.append(d[:block - pad])
      idx.append(i[:block - pad])
    return np.concatenate(dists), np.concatenate(idx)

  def owner(self, global_index: np.ndarray):
    return global_index // self.rows_per_process, global_index % self.rows_per_process


def fetch_rows(local_rows: np.ndarray, db: Database, global_index: np.ndarray) -> np.ndarray:
  """The rows at `global_index`, assembled on every process from their owners."""
  proc, local = db.owner(np.asarray(global_index).reshape(-1))
  out = np.zeros((len(proc), *local_rows.shape[1:]), local_rows.dtype)
  mine = proc == jax.process_index()
  out[mine] = local_rows[local[mine]]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(out))
    out = gathered.sum(0).astype(local_rows.dtype)   # exactly one process owns each row
  return out.reshape(*np.shape(global_index), *local_rows.shape[1:])


def exact_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise L2 distance in float64 (the DCR values reported)."""
  return np.sqrt(np.sum(np.square(a.astype(np.float64) - b.astype(np.float64)), axis=-1))


# ----------------------------------------------------------------------------
# Image similarity (dm-pix)


def _ssim_filter_size(h: int, w: int) -> int:
  size = min(11, h, w)
  return size if size % 2 else size - 1


@functools.lru_cache(maxsize=8)
def _ssim_psnr_fn(filter_size: int):
  import dm_pix as pix

  def fn(a, b):
    return (pix.ssim(a, b, max_val=1.0, filter_size=filter_size),
            pix.psnr(a, b))
  return jax.jit(fn)


def ssim_psnr(a_u8: np.ndarray, b_u8: np.ndarray, batch: int = 512):
  """SSIM and PSNR (dB) of uint8 image pairs, computed on [0, 1] floats (dm-pix's range)."""
  h, w = a_u8.shape[1:3]
  fn = _ssim_psnr_fn(_ssim_filter_size(h, w))
  ssim, psnr = [], []
  tick = metrics.progress('audit: SSIM/PSNR', len(a_u8), 'pairs')
  for s in range(0, len(a_u8), batch):
    tick(s)
    a = jnp.asarray(a_u8[s:s + batch], jnp.float32) / 255.0
    b = jnp.asarray(b_u8[s:s + batch], jnp.float32) / 255.0
    x, y = fn(a, b)
    ssim.append(np.asarray(x))
    psnr.append(np.asarray(y))
  return np.concatenate(ssim), np.concatenate(psnr)


# ----------------------------------------------------------------------------
# Membership inference


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray):
  """(fpr, tpr) over every threshold; higher score = 'member'."""
  scores = np.concatenate([member_scores, nonmember_scores])
  truth = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
  order = np.argsort(-scores, kind='stable')
  scores, truth = scores[order], truth[order]
  distinct = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
  tp = np.cumsum(truth)[distinct]
  fp = np.cumsum(1 - truth)[distinct]
  tpr = np.r_[0.0, tp / max(truth.sum(), 1)]
  fpr = np.r_[0.0, fp / max((1 - truth).sum(), 1)]
  return fpr, tpr


def auc(fpr, tpr) -> float:
  return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr, tpr, target: float) -> float:
  """Highest TPR among thresholds whose FPR is at most `target`."""
  ok = fpr <= target + 1e-12
  return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(member_scores, nonmember_scores, bootstrap: int = 200, seed: int = 0):
  fpr, tpr = roc_curve(member_scores, nonmember_scores)
  out = {'auc': auc(fpr, tpr), 'tpr_at_1pct_fpr': tpr_at_fpr(fpr, tpr, 0.01),
         'tpr_at_0p1pct_fpr': tpr_at_fpr(fpr, tpr, 0.001),
         'members': int(len(member_scores)), 'nonmembers': int(len(nonmember_scores))}
  if bootstrap:
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in ('auc', 'tpr_at_1pct_fpr', 'tpr_at_0p1pct_fpr')}
    for _ in range(bootstrap):
      m = member_scores[rng.integers(0, len(member_scores), len(member_scores))]
      n = nonmember_scores[rng.integers(0, len(nonmember_scores), len(nonmember_scores))]
      f, t = roc_curve(m, n)
      samples['auc'].append(auc(f, t))
      samples['tpr_at_1pct_fpr'].append(tpr_at_fpr(f, t, 0.01))
      samples['tpr_at_0p1pct_fpr'].append(tpr_at_fpr(f, t, 0.001))
    for k, v in samples.items():
      lo, hi = np.percentile(v, [2.5, 97.5])
      out[f'{k}_ci95'] = [float(lo), float(hi)]
  return out, (fpr, tpr)


@functools.lru_cache(maxsize=16)
def _per_example_fn(apply_fn, mean: tuple, std: tuple, mesh):
  def fn(variables, images, labels):
    logits = apply_fn(variables, augment.normalise(images, mean, std), train=False)
    logits = logits.astype(jnp.float32)
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]
    # Logit-scaled confidence log(p / (1 - p)) = z_y - logsumexp_{j != y} z_j (LiRA's phi).
    z_y = jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    phi = z_y - jax.nn.logsumexp(others, axis=-1)
    return loss, phi
  data = parallel.data_sharding(mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), data, data),
                 out_shardings=(data, data))


def per_example_scores(model, variables, images: np.ndarray, labels: np.ndarray, mean, std,
                       batch: int = 512):
  """(loss, phi) per example; images and labels are the same on every process."""
  mesh = parallel.make_mesh()
  batch = parallel.round_up_batch(batch, mesh)
  fn = _per_example_fn(model.apply, tuple(map(float, mean)), tuple(map(float, std)), mesh)
  variables = parallel.replicate(mesh, variables)
  sl = lambda n: slice(jax.process_index() * n // jax.process_count(),
                       (jax.process_index() + 1) * n // jax.process_count())
  losses, phis = [], []
  for s in range(0, len(labels), batch):
    x, y = images[s:s + batch], labels[s:s + batch]
    n = len(y)
    if n < batch:
      x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(batch - n, y.dtype)])
    loss, phi = fn(variables, parallel.to_global(mesh, x[sl(batch)]),
                   parallel.to_global(mesh, y[sl(batch)]))
    loss, phi = parallel.to_host((loss, phi))
    losses.append(loss[:n])
    phis.append(phi[:n])
  return np.concatenate(losses), np.concatenate(phis)


def lira_offline_scores(target_phi: np.ndarray, reference_phi: np.ndarray) -> np.ndarray:
  """Offline LiRA: how far above the OUT distribution the target's phi lies.

  reference_phi: [R, N] phi of each example under R models that did not train on
  it. With few references a global standard deviation is more stable than a
  per-example one (Carlini et al.), so that is used when R < 16.
  """
  mu = reference_phi.mean(0)
  if reference_phi.shape[0] >= 16:
    sigma = reference_phi.std(0) + 1e-6
  else:
    sigma = np.full_like(mu, (reference_phi - mu).std() + 1e-6)
  return (target_phi - mu) / sigma


# ----------------------------------------------------------------------------
# Pictures


def pairs_picture(target, top: np.ndarray, bottom: np.ndarray) -> None:
  """Synthetic images (top row) above their nearest private images (bottom row)."""
  n = len(top)
  cells = np.concatenate([top, bottom])
  scale = max(1, 64 // top.shape[1])
  report.write_png(target, report.image_grid(cells, 2, n, pad=2, scale=scale))


def _figure(figsize):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt.subplots(figsize=figsize)


def _save_figure(fig, target, dpi: int) -> None:
  import io
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi, bbox_inches='tight')
  plt.close(fig)
  fileio.atomic_write_bytes(target, buf.getvalue())


def dcr_picture(target, dcr_synthetic: np.ndarray, dcr_holdout: np.ndarray) -> None:
  """Histograms of the distance to the closest private training image: synthetic images
  against real holdout images (a synthetic mass left of the holdout's is a warning)."""
  fig, ax = _figure((6, 3.5))
  bins = np.linspace(0.0, float(max(dcr_synthetic.max(), dcr_holdout.max())) * 1.02, 40)
  ax.hist(dcr_holdout, bins=bins, alpha=0.6, density=True, label='real holdout (test split)')
  ax.hist(dcr_synthetic, bins=bins, alpha=0.6, density=True, label='synthetic')
  ax.axvline(float(np.percentile(dcr_holdout, 1)), color='k', ls='--', lw=0.8,
             label='holdout 1st percentile')
  ax.set_xlabel('L2 distance to the closest private training image (pixels in [0, 1])')
  ax.set_ylabel('density')
  ax.legend(fontsize=7)
  _save_figure(fig, target, dpi=110)


def roc_picture(target, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
  fig, ax = _figure((5, 5))
  for name, (fpr, tpr) in curves.items():
    ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=name)
  ax.plot([1e-4, 1], [1e-4, 1], 'k--', lw=0.8, label='chance')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('false positive rate')
  ax.set_ylabel('true positive rate')
  ax.set_title('membership inference ROC')
  ax.legend(fontsize=7)
  _save_figure(fig, target, dpi=120)


# ----------------------------------------------------------------------------
# The stage


def _features(model, variables, images_u8: np.ndarray, mean, std, batch=512) -> np.ndarray:
  """Unit-normalised penultimate features, computed on the caller's images (process-local)."""
  apply = jax.jit(lambda v, x: model.apply(v, augment.normalise(x, mean, std), train=False,
                                           return_features=True)[1])
  out = [np.asarray(apply(variables, images_u8[s:s + batch]))
         for s in range(0, len(images_u8), batch)]
  f = np.concatenate(out) if out else np.zeros((0, 1), np.float32)
  return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _flat(images_u8: np.ndarray) -> np.ndarray:
  return images_u8.reshape(len(images_u8), -1).astype(np.float32) / 255.0


def _gather_examples(partitions, split_size, num_partitions, global_indices):
  """Images and labels of the given split indices, on every process."""
  local_idx = np.concatenate([input_pipeline.partition_members(split_size, num_partitions,
                                                               p.index) for p in partitions])
  images = np.concatenate([p.images for p in partitions])
  labels = np.concatenate([p.labels for p in partitions])
  keep = np.isin(local_idx, global_indices)
  idx = parallel.allgather_rows(local_idx[keep])
  imgs = parallel.allgather_rows(images[keep])
  labs = parallel.allgather_rows(labels[keep])
  order = np.argsort(idx)
  pos = np.searchsorted(idx[order], global_indices)
  return imgs[order][pos], labs[order][pos]


def visual_audit(cfg, teacher, teacher_vars, tm, synth, train_parts, test_images, out_dir):
  mesh = parallel.make_mesh()
  mean, std = tm['mean'], tm['std']
  train_images = np.concatenate([p.images for p in train_parts])
  results = {}
  # (a) pixel L2 and (b) teacher-feature cosine neighbours.
  pixel_db = Database(_flat(train_images), mesh)
  d_l2, i_l2 = pixel_db.search(_flat(synth.images), cfg.k, 'l2', cfg.block_size)
  feature_db = Database(_features(teacher, teacher_vars, train_images, mean, std), mesh)
  d_cos, i_cos = feature_db.search(_features(teacher, teacher_vars, synth.images, mean, std),
                                   cfg.k, 'cosine', cfg.block_size)
  # SSIM / PSNR against every candidate of both metrics; keep the most similar.
  candidates = np.concatenate([i_l2, i_cos], axis=1)                       # [Q, 2k]
  neighbour_images = fetch_rows(train_images, pixel_db, candidates)        # [Q, 2k, H, W, C]
  q, kk = candidates.shape
  ssim, psnr = ssim_psnr(np.repeat(synth.images, kk, axis=0),
                         neighbour_images.reshape(q * kk, *synth.images.shape[1:]))
  ssim, psnr = ssim.reshape(q, kk), psnr.reshape(q, kk)
  best = np.argmax(ssim, axis=1)
  nn_ssim = ssim[np.arange(q), best]
  nn_psnr = psnr[np.arange(q), best]
  best_images = neighbour_images[np.arange(q), best]
  # DCR: exact float64 distance to the closest training image, synthetic vs real holdout.
  nearest = fetch_rows(train_images, pixel_db, i_l2[:, 0])
  dcr_synth = exact_l2(_flat(synth.images), _flat(nearest))
  _, i_hold = pixel_db.search(_flat(test_images), 1, 'l2', cfg.block_size)
  dcr_hold = exact_l2(_flat(test_images), _flat(fetch_rows(train_images, pixel_db, i_hold[:, 0])))
  hold_p01 = float(np.percentile(dcr_hold, 1))
  results['nn_ssim'] = {'max': float(nn_ssim.max()), 'p99': float(np.percentile(nn_ssim, 99)),
                        'p50': float(np.median(nn_ssim)), 'mean': float(nn_ssim.mean())}
  results['nn_psnr'] = {'max': float(nn_psnr.max()), 'p99': float(np.percentile(nn_psnr, 99)),
                        'p50': float(np.median(nn_psnr))}
  results['dcr'] = {'synthetic_p01': float(np.percentile(dcr_synth, 1)),
                    'synthetic_p50': float(np.median(dcr_synth)),
                    'synthetic_min': float(dcr_synth.min()),
                    'holdout_p01': hold_p01, 'holdout_p50': float(np.median(dcr_hold)),
                    'holdout_min': float(dcr_hold.min()),
                    'holdout_count': int(len(dcr_hold))}
  results['synthetic_closer_than_holdout_p01'] = int(np.sum(dcr_synth < hold_p01))
  results['ssim_filter_size'] = _ssim_filter_size(*synth.images.shape[1:3])
  results['k'] = cfg.k
  results['feature_cosine_distance_p50'] = float(np.median(d_cos[:, 0]))
  n = min(cfg.num_pictures, q)
  top = np.argsort(-nn_ssim)[:n]
  rand = np.random.default_rng(0).choice(q, n, replace=False)
  random_neighbours = fetch_rows(train_images, pixel_db, i_l2[rand, 0])  # collective
  results['most_similar_ssim'] = [float(nn_ssim[i]) for i in top]
  if parallel.is_main_process():
    pairs_picture(out_dir / 'most_similar.png', synth.images[top], best_images[top])
    pairs_picture(out_dir / 'random_pairs.png', synth.images[rand], random_neighbours)
    dcr_picture(out_dir / 'dcr.png', dcr_synth, dcr_hold)
    fileio.atomic_write_npz(out_dir / 'neighbours.npz', nn_ssim=nn_ssim, nn_psnr=nn_psnr,
                            dcr_synthetic=dcr_synth, dcr_holdout=dcr_hold, l2_index=i_l2,
                            l2_distance=d_l2, cosine_index=i_cos, cosine_distance=d_cos)
  return results


def _reference_models(config, workdir, data, tm, exclude: np.ndarray):
  """Trains (or loads) the OUT reference models; returns a list of (model, variables)."""
  cfg = config.audit
  n_train = data.split_size('train')
  pool = np.setdiff1d(np.arange(n_train), exclude)
  refs = []
  for r in range(cfg.reference_models):
    out = stage_dir(workdir, 'audit') / f'reference_{r}'
    if (out / artifacts.MANIFEST_FILE).exists():
      model, variables, _ = artifacts.load_model(out)
      refs.append((model, variables))
      continue
    rng = np.random.default_rng([config.seed, 100 + r])
    chosen = np.sort(rng.choice(pool, int(len(pool) * cfg.reference_train_fraction),
                                replace=False))
    images, labels = _gather_examples(data.split('train'), n_train, data.num_partitions, chosen)
    parts = [input_pipeline.Partition(p, images[m], labels[m]) for p in data.partition_ids
             for m in [input_pipeline.partition_members(len(chosen), data.num_partitions, p)]]
    recipe = config.teacher.copy_and_resolve_references()
    recipe.epochs = cfg.reference_epochs
    recipe.num_steps = 0
    recipe.eval_every_epochs = 0
    batches = input_pipeline.PartitionedBatches(parts, data.num_partitions, len(chosen),
                                                recipe.batch_size, seed=config.seed + 100 + r)
    variables, _ = train.fit_and_save(
        out, model_config=config.model, class_names=tm['class_names'],
        num_classes=tm['num_classes'], image_shape=tm['image_shape'], mean=tm['mean'],
        std=tm['std'], extra=lambda s: {'trained_on': 'audit reference',
                                        'num_images': len(chosen)},
        name=f'reference_{r}', cfg=recipe, batches=batches, seed=config.seed + 100 + r)
    refs.append((models.create_model(config.model.name, tm['num_classes'],
                                     stem=config.model.stem, dtype=config.model.dtype,
                                     norm=config.model.get('norm', 'batch')),
                 variables))
  return refs


def membership_audit(config, workdir, data, tm, targets: dict[str, tuple], out_dir):
  """targets: name -> (model, variables, member_images, member_labels) or None members
  (None = the teacher's training sample)."""
  cfg = config.audit
  n_train, n_test = data.split_size('train'), data.split_size('test')
  count = min(cfg.mia_examples, n_test, n_train // 2)
  rng = np.random.default_rng([config.seed, 7])
  member_idx = np.sort(rng.choice(n_train, count, replace=False))
  nonmember_idx = np.sort(rng.choice(n_test, count, replace=False))
  members = _gather_examples(data.split('train'), n_train, data.num_partitions, member_idx)
  nonmembers = _gather_examples(data.split('test'), n_test, data.num_partitions, nonmember_idx)
  refs = _reference_models(config, workdir, data, tm, member_idx) if cfg.reference_models else []
  results, curves = {}, {}
  ref_cache: dict[int, np.ndarray] = {}
  for name, (model, variables, own_members) in targets.items():
    m_images, m_labels = own_members if own_members is not None else members
    k = min(len(m_labels), count)
    m_images, m_labels = m_images[:k], m_labels[:k]
    n_images, n_labels = nonmembers[0][:k], nonmembers[1][:k]
    loss_m, phi_m = per_example_scores(model, variables, m_images, m_labels, tm['mean'], tm['std'])
    loss_n, phi_n = per_example_scores(model, variables, n_images, n_labels, tm['mean'], tm['std'])
    metrics_loss, curve = attack_metrics(-loss_m, -loss_n, cfg.bootstrap, config.seed)
    entry = {'loss_threshold': metrics_loss, **{k2: v for k2, v in metrics_loss.items()}}
    curves[f'{name} (loss)'] = curve
    if refs and own_members is None:
      ref_phi = []
      for r, (rm, rv) in enumerate(refs):
        if r not in ref_cache:
          ref_cache[r] = np.concatenate([
              per_example_scores(rm, rv, members[0], members[1], tm['mean'], tm['std'])[1],
              per_example_scores(rm, rv, *nonmembers, tm['mean'], tm['std'])[1]])
        ref_phi.append(ref_cache[r])
      ref_phi = np.stack(ref_phi)
      scores = lira_offline_scores(np.concatenate([phi_m, phi_n]), ref_phi)
      metrics_lira, curve = attack_metrics(scores[:k], scores[count:count + k], cfg.bootstrap,
                                           config.seed)
      entry['lira_offline'] = metrics_lira
      curves[f'{name} (offline LiRA)'] = curve
      # The headline numbers are those of the stronger attack (by AUC).
      if metrics_lira['auc'] > metrics_loss['auc']:
        entry.update({k2: v for k2, v in metrics_lira.items()})
        entry['attack'] = 'lira_offline'
      else:
        entry['attack'] = 'loss_threshold'
    else:
      entry['attack'] = 'loss_threshold'
    results[name] = entry
  if parallel.is_main_process():
    roc_picture(out_dir / 'roc.png', curves)
  return results, {'members': int(count), 'reference_models': len(refs)}


def validate(config) -> None:
  if config.audit.k < 1:
    raise UserError('audit.k must be >= 1')


def run(config, workdir, data: PrivateData) -> dict:
  cfg = config.audit
  out_dir = stage_dir(workdir, 'audit')
  teacher, teacher_vars, tm = artifacts.load_model(teacher_dir(config, workdir))
  synth = synthetic_data.load_synthetic(cfg.synthetic_dir or
                                        stage_dir(workdir, 'synthesize'))
  if synth.manifest['teacher_sha256'] != tm['variables_sha256']:
    logging.warning('audit: the synthetic dataset was made with another teacher (sha256 %s); '
                    'auditing it against this workdir\'s private data anyway',
                    synth.manifest['teacher_sha256'][:12])
  train_parts = data.split('train')
  test_images = np.concatenate([p.images for p in data.split('test')])
  test_images = parallel.allgather_rows(test_images)
  if cfg.holdout_examples and cfg.holdout_examples < len(test_images):
    pick = np.random.default_rng(config.seed).choice(len(test_images), cfg.holdout_examples,
                                                     replace=False)
    test_images = test_images[np.sort(pick)]
  values = visual_audit(cfg, teacher, teacher_vars, tm, synth, train_parts, test_images, out_dir)
  logging.info('audit: nn_ssim max %.3f p99 %.3f; DCR p01 synthetic %.3f holdout %.3f',
               values['nn_ssim']['max'], values['nn_ssim']['p99'],
               values['dcr']['synthetic_p01'], values['dcr']['holdout_p01'])

  targets = {'teacher': (teacher, teacher_vars, None)}
  student_dir = cfg.student_dir or (stage_dir(workdir, 'student') / 'synthetic')
  if (fileio.path(student_dir) / artifacts.MANIFEST_FILE).exists():
    model, variables, _ = artifacts.load_model(student_dir)
    targets['student'] = (model, variables, None)
  real_dir = stage_dir(workdir, 'evaluate') / 'real_subset'
  members_file = stage_dir(workdir, 'evaluate') / evaluation.MEMBERS_FILE
  if (real_dir / artifacts.MANIFEST_FILE).exists() and members_file.exists():
    model, variables, _ = artifacts.load_model(real_dir)
    members = fileio.read_npz(members_file)['indices']
    images, labels = _gather_examples(train_parts, data.split_size('train'),
                                      data.num_partitions, members)
    targets['real_subset'] = (model, variables, (images, labels))
  mia, info = membership_audit(config, workdir, data, tm, targets, out_dir)
  values['mia'] = mia
  values['mia_setup'] = info
  if parallel.is_main_process():
    fileio.atomic_write_json(out_dir / 'manifest.json', values)
  report.update(workdir, {'audit': values})
  return values
