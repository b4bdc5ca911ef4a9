"""Every test runs with 8 simulated CPU devices (set before JAX starts)."""

import os
import pathlib
import subprocess
import sys

# 8 simulated devices share 2 cores, with other test processes beside them: XLA's CPU
# collectives abort a process whose devices wait long for each other, which a busy
# machine can reach without anything being wrong; give them longer.
# The tests' programs are tiny, so much of a test's time is XLA compiling them, most of it
# in LLVM's optimisation passes: the suite compiles at LLVM level 1 (BNSYNTH_TEST_XLA_OPT;
# XLA's default is 3). Measured alone on this 2-core machine, fresh caches: the canary audit
# test's 4 tiny shadow pipelines 106 s at level 3, 75 s at 1, 65 s at 0; the digits teacher
# (675 steps of resnet8) 39.6 s at 3, 34.7 s at 1, 153 s at 0 (its code runs 4x slower),
# 99.44% test accuracy at 3 and 1 (98.89% at 0: rounding differs between levels, as between
# machines; no test compares results across levels).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=900'
                           ' --xla_backend_optimization_level='
                           + os.environ.get('BNSYNTH_TEST_XLA_OPT', '1')).strip()
# XLA's CPU client sizes its two thread pools max(cores, devices): 8 on a 2-core machine. A
# program with a collective occupies up to two threads per simulated device while it waits
# for the others (a launching thread blocked until the run is ready, a runner inside the
# all-reduce); when one device's launch also waits, for its previous program's release, on
# the last free thread, no thread is left to release it and the suite hangs with the CPU
# idle. gdb on a hung run here: 7 devices in InProcessCommunicator::AllReduce, the 8th in
# Semaphore::Acquire, all 8 client-pool threads blocked; `pytest tests/test_audit.py -k
# "memorised or 8_devices"` hung 2 times in 12 with 8 threads, 0 in 32 with 32
# (PJRT_NPROC, which XLA reads for the pool size).
os.environ.setdefault('PJRT_NPROC', '32')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _compilation_cache() -> str:
  """JAX's persistent compilation cache, shared by this process and every subprocess it
  starts (they inherit the environment): the end-to-end tests compile the same train and
  synthesis steps again and again. CI points BNSYNTH_TEST_JAX_CACHE at a fresh folder per
  leg; elsewhere a folder per test session. BNSYNTH_TEST_JAX_CACHE=off disables it. CPU
  programs compile in well under JAX's default 1 s threshold: cache everything."""
  folder = os.environ.get('BNSYNTH_TEST_JAX_CACHE', '')
  if folder == 'off':
    return ''
  if not folder:
    import atexit
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix='bnsynth-jax-cache-')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = folder
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  # XLA:CPU logs an error-level line for every cached program it loads ("machine feature
  # +prefer-no-gather is not supported": tuning flags, not instruction sets; the programs
  # run the same); it would drown the subprocesses' stderr that the tests read.
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
  return folder


COMPILATION_CACHE = _compilation_cache()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import signal  # noqa: E402

# A suite started in the background of a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every subprocess it starts: the Ctrl-C tests would then test nothing.
# Restore Python's own handler (subprocesses then start with the default disposition).
signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Synchronous CPU dispatch in the test process: each program finishes before the next
# starts, so a failure points at the program that caused it; results are unchanged.
jax.config.update('jax_cpu_enable_async_dispatch', False)

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ROOT = pathlib.Path(os.environ.get('BNSYNTH_CIFAR10', '~/.cache/bnsynth/cifar10')).expanduser()


def pytest_configure(config):
  assert jax.device_count() == 8, f'expected 8 simulated devices, got {jax.devices()}'


# BNSYNTH_TEST_SUBPROCESS=1 runs every run_main in its own process, as the suite did
# before the in-process runner (to check the two agree).
ALWAYS_SUBPROCESS = os.environ.get('BNSYNTH_TEST_SUBPROCESS', '') == '1'


def run_main(*args, env=None, timeout=600, own_process=False):
  """Runs the command line `python -m bnsynth_jax.main ARGS`; returns a CompletedProcess
  (returncode, stdout, stderr).

  In this process by default: the same flag parsing and `main.main` as the command, with
  file descriptors 1 and 2 captured, so a run pays neither the imports nor, for programs
  an earlier run compiled, the compilation. In a subprocess where the test needs a process
  of its own: `env` (e.g. a PYTHONPATH that blocks TensorFlow), or `own_process=True`
  (its pid matters, or it may end the process with os._exit: signals, disk faults)."""
  if env is not None or own_process or ALWAYS_SUBPROCESS:
    full_env = dict(os.environ, **(env or {}))
    full_env['PYTHONPATH'] = str(REPO) + os.pathsep + full_env.get('PYTHONPATH', '')
    return subprocess.run([sys.executable, '-m', 'bnsynth_jax.main', *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
  return _run_main_in_this_process(list(args))


def _run_main_in_this_process(args: list[str]) -> subprocess.CompletedProcess:
  import tempfile
  import traceback
  from absl import flags
  from absl import logging as absl_logging
  from bnsynth_jax import checkpointing
  from bnsynth_jax import main as entry
  import logging as py_logging
  handler = absl_logging.get_absl_handler()
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  captured = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
  sys.stdout.flush()
  sys.stderr.flush()
  saved_fds = [os.dup(1), os.dup(2)]
  saved_streams = sys.stdout, sys.stderr, handler.python_handler.stream
  saved_argv, cwd = sys.argv, os.getcwd()
  levels = py_logging.root.level, py_logging.getLogger('absl').level
  added = False
  code = 0
  try:
    for fd, f in zip((1, 2), captured):
      os.dup2(f.fileno(), fd)
    sys.stdout = open(1, 'w', closefd=False, buffering=1)
    sys.stderr = open(2, 'w', closefd=False, buffering=1)
    handler.python_handler.stream = sys.stderr
    added = handler not in py_logging.root.handlers
    if added:
      py_logging.root.addHandler(handler)
    os.chdir(REPO)
    sys.argv = ['bnsynth_jax.main', *args]     # config_flags reads its overrides from it
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)                # the last run's --config.* override flags
    flags.FLAGS.unparse_flags()
    try:
      remaining = entry.parse_flags(['bnsynth_jax.main', *args])
      absl_logging.set_verbosity(absl_logging.INFO)
      entry.main(remaining)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 -- what a crashed command prints, and its exit code
      traceback.print_exc()
      code = 1
    finally:
      checkpointing.close_all()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    if added:
      py_logging.root.removeHandler(handler)
    py_logging.root.setLevel(levels[0])
    py_logging.getLogger('absl').setLevel(levels[1])
    sys.stdout, sys.stderr, handler.python_handler.stream = saved_streams
    for fd, saved in zip((1, 2), saved_fds):
      os.dup2(saved, fd)
      os.close(saved)
    os.chdir(cwd)
    sys.argv = saved_argv
    for sig, h in previous.items():
      signal.signal(sig, h)
  out, err = [(f.seek(0), f.read().decode(errors='replace'))[1] for f in captured]
  for f in captured:
    f.close()
  return subprocess.CompletedProcess(['bnsynth_jax.main', *args], code, out, err)


def write_image_folder(root: pathlib.Path, classes=('cat', 'dog', 'fish'), per_class=6,
                       splits=('train', 'test'), size=12, seed=0, modes=('RGB',)):
  """Writes ROOT/<split>/<class>/i.png with random images; returns root."""
  from PIL import Image
  rng = np.random.RandomState(seed)
  for split in splits:
    for c, name in enumerate(classes):
      d = root / split / name
      d.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        mode = modes[i % len(modes)]
        arr = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
        arr[..., c % 3] = 255 - 20 * c            # class-dependent colour
        Image.fromarray(arr, 'RGB').convert(mode).save(d / f'{i}.png')
  return root


@pytest.fixture
def image_folder(tmp_path):
  return write_image_folder(tmp_path / 'images')


@pytest.fixture(scope='session')
def cifar_root():
  if not (CIFAR_ROOT / 'train').is_dir():
    pytest.skip(f'CIFAR-10 image folder not found at {CIFAR_ROOT} (unpack '
                '../shared/data/cifar10/cifar10-jpeg.tar.gz there or set BNSYNTH_CIFAR10)')
  return CIFAR_ROOT
