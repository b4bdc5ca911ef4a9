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
    assert r['per_second'] > 0 and r['flops_per_step'] > 0
    assert r['per_second'] == pytest.approx(8 / r['seconds_per_step'])
  if torch_flag:
    synth = rows[0]
    low, high = synth['jax_over_torch_range']
    assert synth['rounds'] == 2 and low <= synth['jax_over_torch'] <= high
    assert synth['torch_per_second'] > 0
  assert 'jax_over_torch' not in rows[1]
