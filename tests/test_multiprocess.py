"""2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo) == 1 process x 8 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bnsynth_jax import checkpointing, synthetic_data
from conftest import REPO

# jax.distributed over gloo: CI runs this on both jax ends.
pytestmark = pytest.mark.versions

ARGS = ('--config=configs/digits.py', '--stages=teacher,stats,synthesize',
        '--config.data.num_partitions=2',            # the same batches on 1 or 2 processes
        '--config.teacher.num_steps=12', '--config.teacher.checkpoint_every_steps=5',
        '--config.synthesis.images_per_class=8', '--config.synthesis.batch_size=16',
        '--config.synthesis.iterations=10', '--config.synthesis.checkpoint_every_iterations=4')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, devices, extra=(), log=None):
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS=os.environ['XLA_FLAGS'].replace(
                 '--xla_force_host_platform_device_count=8',
                 f'--xla_force_host_platform_device_count={devices}'))
  return subprocess.Popen([sys.executable, '-m', 'bnsynth_jax.main', *ARGS,
                           f'--workdir={workdir}', *extra], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)


def test_two_processes_match_one(tmp_path):
  one = launch(tmp_path / 'one', 8)
  port = free_port()
  logs = [open(tmp_path / f'p{i}.log', 'w') for i in range(2)]
  procs = [launch(tmp_path / 'two', 4, ('--distributed', f'--coordinator=127.0.0.1:{port}',
                                        '--num_processes=2', f'--process_id={i}',
                                        '--cpu_collectives=gloo'), logs[i]) for i in range(2)]
  try:
    assert one.wait(timeout=900) == 0
    for i, p in enumerate(procs):
      assert p.wait(timeout=900) == 0, (tmp_path / f'p{i}.log').read_text()[-3000:]
  finally:
    for p in procs + [one]:
      if p.poll() is None:
        p.kill()
  # Teacher training steps: the same parameters and batch statistics.
  a, _ = checkpointing.load_variables(tmp_path / 'one' / 'teacher' / 'variables.msgpack')
  b, _ = checkpointing.load_variables(tmp_path / 'two' / 'teacher' / 'variables.msgpack')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # The written synthetic dataset: the same labels; the same images up to uint8 rounding
  # (float reductions run in another order, so a value at a .5 boundary may round the
  # other way: at most one grey level, in a tiny fraction of pixels); soft labels to float error.
  da = synthetic_data.load_synthetic(tmp_path / 'one' / 'synthetic')
  db = synthetic_data.load_synthetic(tmp_path / 'two' / 'synthetic')
  pixel_diff = np.abs(da.images.astype(int) - db.images.astype(int))
  assert pixel_diff.max() <= 1 and np.mean(pixel_diff > 0) < 1e-3, (pixel_diff.max(),
                                                                     np.mean(pixel_diff > 0))
  np.testing.assert_array_equal(da.labels, db.labels)
  np.testing.assert_allclose(da.soft_labels, db.soft_labels, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(da.loss, db.loss, rtol=1e-4, atol=1e-5)
  # Only process 0 wrote the shared files; process 1 left nothing of its own.
  assert sorted(p.name for p in (tmp_path / 'two' / 'synthetic' / 'shards').iterdir()) == [
      f'shard-{i:05d}.npz' for i in range(5)]
