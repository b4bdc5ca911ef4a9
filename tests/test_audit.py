import jax
import numpy as np
import pytest

from bnsynth_jax import audit, config_lib, input_pipeline, models, parallel, train


@pytest.mark.versions
@pytest.mark.parametrize('metric', ['l2', 'cosine'])
def test_exact_topk_equals_numpy_brute_force_on_8_devices(metric):
  assert parallel.make_mesh().devices.size == 8
  rng = np.random.RandomState(0)
  db = rng.randn(203, 17).astype(np.float32)        # not a multiple of 8: padding is exercised
  queries = rng.randn(37, 17).astype(np.float32)
  if metric == 'cosine':
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    want = 1.0 - queries.astype(np.float64) @ db.T.astype(np.float64)
  else:
    want = ((queries[:, None, :].astype(np.float64) - db[None]) ** 2).sum(-1)
  database = audit.Database(db, parallel.make_mesh())
  dist, idx = database.search(queries, k=4, metric=metric, block=16)
  np.testing.assert_array_equal(idx, np.argsort(want, axis=1, kind='stable')[:, :4])
  np.testing.assert_allclose(dist, np.sort(want, axis=1)[:, :4], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(audit.fetch_rows(db, database, idx[:, 0]), db[idx[:, 0]])


def _gaussian_window(size=11, sigma=1.5):
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  return np.outer(g, g)


def _ssim_reference(a, b, size=11):
  """Wang et al. 2004 with a Gaussian window, 'valid' positions, mean over channels."""
  from numpy.lib.stride_tricks import sliding_window_view
  w = _gaussian_window(size)
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  out = []
  for ch in range(a.shape[-1]):
    x = sliding_window_view(a[..., ch], (size, size))
    y = sliding_window_view(b[..., ch], (size, size))
    mx, my = (x * w).sum((-1, -2)), (y * w).sum((-1, -2))
    sxx = (x * x * w).sum((-1, -2)) - mx ** 2
    syy = (y * y * w).sum((-1, -2)) - my ** 2
    sxy = (x * y * w).sum((-1, -2)) - mx * my
    out.append(((2 * mx * my + c1) * (2 * sxy + c2) /
                ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean())
  return float(np.mean(out))


def test_ssim_and_psnr_match_reference_values():
  rng = np.random.RandomState(0)
  img = rng.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  ssim, psnr = audit.ssim_psnr(img, img)
  np.testing.assert_allclose(ssim, 1.0, atol=1e-5)
  assert np.all(np.isinf(psnr))
  # A constant offset of 16 grey levels: PSNR is exactly -10 log10((16/255)^2).
  img_mid = np.clip(img, 0, 239)
  shifted = (img_mid.astype(int) + 16).astype(np.uint8)
  _, psnr = audit.ssim_psnr(img_mid, shifted)
  np.testing.assert_allclose(psnr, -10 * np.log10((16 / 255) ** 2), rtol=1e-4)
  # Noise: dm-pix's SSIM (on [0, 1] floats) equals an independent NumPy implementation.
  noisy = np.clip(img.astype(int) + rng.randint(-40, 41, img.shape), 0, 255).astype(np.uint8)
  ssim, _ = audit.ssim_psnr(img, noisy)
  for i in range(2):
    want = _ssim_reference(img[i] / 255.0, noisy[i] / 255.0)
    np.testing.assert_allclose(ssim[i], want, rtol=2e-3)
  assert np.all(ssim < 0.99)   # the distortion is seen


def test_attack_metrics_on_known_distributions():
  rng = np.random.RandomState(0)
  same = audit.attack_metrics(rng.randn(2000), rng.randn(2000), bootstrap=50)[0]
  assert abs(same['auc'] - 0.5) < 0.04
  assert same['auc_ci95'][0] < 0.5 < same['auc_ci95'][1]
  apart = audit.attack_metrics(rng.randn(500) + 6, rng.randn(500), bootstrap=0)[0]
  assert apart['auc'] > 0.999 and apart['tpr_at_1pct_fpr'] > 0.95
  fpr, tpr = audit.roc_curve(np.array([3., 2.]), np.array([1., 0.]))
  assert audit.auc(fpr, tpr) == 1.0


def test_roc_and_auc_agree_with_scikit_learn():
  """Tied and untied scores, unbalanced sets: the ROC points and AUC equal sklearn's."""
  from sklearn import metrics as skm
  rng = np.random.default_rng(0)
  for members, nonmembers in (
      (rng.normal(0.7, 1.0, 300), rng.normal(0.0, 1.0, 500)),
      (np.round(rng.normal(0.5, 1.0, 200), 1), np.round(rng.normal(0.0, 1.0, 150), 1))):
    fpr, tpr = audit.roc_curve(members, nonmembers)
    truth = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    scores = np.r_[members, nonmembers]
    sk_fpr, sk_tpr, _ = skm.roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert audit.auc(fpr, tpr) == pytest.approx(skm.roc_auc_score(truth, scores), abs=1e-12)
    for target in (0.01, 0.1):   # the highest TPR at FPR <= target
      assert audit.tpr_at_fpr(fpr, tpr, target) == pytest.approx(
          sk_tpr[sk_fpr <= target].max(), abs=1e-12)


def test_loss_attack_finds_a_memorised_set(tmp_path):
  """A network that memorised random labels: members are told apart (AUC ~ 1)."""
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (96, 8, 8, 1)).astype(np.uint8)
  labels = rng.randint(0, 4, 96).astype(np.int32)
  members, nonmembers = slice(0, 48), slice(48, 96)
  cfg = config_lib.train_config(batch_size=48, num_steps=300, learning_rate=0.05,
                                weight_decay=0.0, crop_padding=0, flip=False,
                                warmup_epochs=0.0, eval_every_epochs=0, log_every_steps=100,
                                checkpoint_every_steps=1000)
  model = models.create_model('resnet_tiny', 4)
  parts = [input_pipeline.Partition(0, images[members], labels[members])]
  batches = input_pipeline.PartitionedBatches(parts, 1, 48, 48, seed=0)
  variables, _ = train.fit(name='memorise', model=model, cfg=cfg, batches=batches,
                           image_shape=(8, 8, 1), num_classes=4, mean=[0.5], std=[0.3],
                           workdir=tmp_path, seed=0)
  loss_m, _ = audit.per_example_scores(model, variables, images[members], labels[members],
                                       [0.5], [0.3])
  loss_n, _ = audit.per_example_scores(model, variables, images[nonmembers],
                                       labels[nonmembers], [0.5], [0.3])
  result = audit.attack_metrics(-loss_m, -loss_n, bootstrap=0)[0]
  assert result['auc'] > 0.95


def test_lira_scores_calibrate_per_example_difficulty():
  rng = np.random.RandomState(0)
  difficulty = rng.randn(400) * 3           # examples differ a lot in how easy they are
  reference = difficulty + rng.randn(8, 400) * 0.3
  target = difficulty + rng.randn(400) * 0.3
  target[:200] += 1.0                        # members: a small boost over their difficulty
  scores = audit.lira_offline_scores(target, reference)
  calibrated = audit.attack_metrics(scores[:200], scores[200:], bootstrap=0)[0]['auc']
  raw = audit.attack_metrics(target[:200], target[200:], bootstrap=0)[0]['auc']
  assert calibrated > 0.9 and raw < 0.7
