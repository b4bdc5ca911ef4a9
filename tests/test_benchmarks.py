"""benchmarks/throughput.py runs end to end on a tiny model and writes sane rows."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO


def test_throughput_benchmark_rows(tmp_path):
  out = tmp_path / 'throughput.json'
  torch_flag = ['--torch'] if importlib.util.find_spec('torch') else []
  result = subprocess.run(
      [sys.executable, 'benchmarks/throughput.py', '--models=resnet20', '--batch_sizes=8',
       '--kinds=synthesis,train', '--steps=1', '--repeats=2', '--warmup=1', '--no_results_md',
       f'--out={out}', *torch_flag], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [r['kind'] for r in rows] == ['synthesis', 'train']
  for r in rows:
    assert r['per_second'] > 0 and r['seconds_per_step'] > 0
  # XLA's FLOP count against the known cost of ResNet-20: about 41 M multiply-adds per
  # 32x32 image forward, so ~0.08 GFLOP forward and ~3x that for a training step (forward,
  # input and weight gradients): 8 images -> ~1.9 GFLOP. A wrong model, batch or cost
  # analysis lands far outside these bounds.
  train_row = rows[1]
  assert 1.0e9 < train_row['flops_per_step'] < 4.0e9, train_row['flops_per_step']
  assert 0.3e9 < rows[0]['flops_per_step'] < train_row['flops_per_step'] * 1.5
  if torch_flag:
    synth = rows[0]
    low, high = synth['jax_over_torch_range']
    assert synth['rounds'] == 2 and low <= synth['jax_over_torch'] <= high
    assert synth['torch_per_second'] > 0
  assert 'jax_over_torch' not in rows[1]
