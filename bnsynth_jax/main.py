"""Entry point: python -m bnsynth_jax.main --config=configs/NAME.py --workdir=DIR.

All logic lives in bnsynth_jax.pipeline; this file parses flags, optionally
starts jax.distributed, and turns bad input into a one-line error and exit 2.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

# TensorFlow (used only by the TFDS source) must not grab GPU memory or log noise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bnsynth_jax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Configuration file (configs/NAME.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for every artifact of the run (local or gs://).')
flags.DEFINE_string('stages', 'all', 'Comma-separated stages to run (teacher, stats, '
                    'synthesize, student, evaluate, audit) or "all". Finished stages are '
                    'skipped, unfinished ones resume.')
flags.DEFINE_bool('overwrite', False, 'Replace stages whose stored config differs from this '
                  'one (and every later stage) instead of refusing.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host).')
flags.DEFINE_string('coordinator', '', 'jax.distributed coordinator address (host:port); '
                    'empty = auto-detect (Cloud TPU, SLURM).')
flags.DEFINE_integer('num_processes', 0, 'jax.distributed process count (0 = auto).')
flags.DEFINE_integer('process_id', -1, 'jax.distributed process id (-1 = auto).')
flags.DEFINE_string('cpu_collectives', '', 'CPU collectives for multi-process CPU runs '
                    '(gloo); empty = JAX default.')


def _fail(message: str, code: int = 2) -> None:
  for line in message.splitlines() or ['']:     # a preflight may find several problems
    print(f'error: {line}', file=sys.stderr, flush=True)
  sys.exit(code)


class Terminated(BaseException):
  """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _on_sigterm(signum, frame):
  raise Terminated()


_DISK_FULL = ('No space left on device', 'RESOURCE_EXHAUSTED', 'ENOSPC', 'Disk quota exceeded')
_NO_PERMISSION = ('Permission denied', 'PERMISSION_DENIED', 'Read-only file system')


def _stop(message: str, code: int) -> None:
  """Ends an interrupted or failed run: lets an asynchronous checkpoint save in flight
  complete or fail (a second signal meanwhile exits at once), prints one line, and exits
  without running the background threads' shutdown (an interrupted orbax, TensorStore or
  TensorBoard thread would print tracebacks after the line). Atomic writes are complete or
  removed by then (fileio defers signals and cleans up failed writes)."""
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  try:
    from bnsynth_jax import checkpointing
    checkpointing.close_all()
  except Exception as e:  # noqa: BLE001 -- the run is ending; the next one resumes anyway
    logging.warning('while finishing checkpoint writes: %s', ' '.join(str(e).split())[:300])
  sys.stdout.flush()
  sys.stderr.flush()
  # Background threads still unwinding (TensorStore callbacks into a closed event loop) must
  # not print after the line: stderr goes to /dev/null, the line to the real stderr.
  real = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  # A leading newline: a thread may have left a partial line on the real stderr.
  os.write(real, f'\nerror: {message}\n'.encode())
  os._exit(code)


def _nearly_full(workdir: str) -> bool:
  """A failure with a full workdir filesystem is a disk-full failure, whatever a background
  thread's exception says (orbax can surface it as a closed event loop)."""
  import shutil
  try:
    return shutil.disk_usage(os.path.expanduser(workdir)).free < (4 << 20)
  except (OSError, TypeError, ValueError):
    return False


def fault_message(e: BaseException, workdir: str) -> str | None:
  """One line for an environment fault (disk full, permission lost), or None.

  Orbax and TensorStore report them as their own error types with the OS message
  inside, so the whole chain of causes is searched for the errno or its text.
  """
  resume = 'then run the same command again: finished work is kept and the run resumes'
  chain, seen = [], e
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  codes = {getattr(x, 'errno', None) for x in chain}
  text = ' '.join(str(x) for x in chain)
  where = next((getattr(x, 'filename', None) for x in chain if getattr(x, 'filename', None)),
               None) or workdir
  if (codes & {errno.ENOSPC, errno.EDQUOT} or any(t in text for t in _DISK_FULL)
      or _nearly_full(workdir)):
    return f'disk full while writing {where}: free space there (or choose another --workdir), {resume}'
  if codes & {errno.EACCES, errno.EPERM, errno.EROFS} or any(t in text for t in _NO_PERMISSION):
    return (f'permission denied on {where}: restore write access to the workdir (or choose '
            f'another --workdir), {resume}')
  return None


def bundled_config(argv):
  """`--config=configs/NAME.py[:arg]` names the bundled configs from any folder: a path
  that does not exist here is looked up in the installed package (bnsynth_jax/configs)."""
  out = []
  for arg in argv:
    if arg.startswith('--config=configs/'):
      path, sep, variant = arg[len('--config='):].partition(':')
      if not os.path.exists(path):
        import importlib.util
        spec = importlib.util.find_spec('bnsynth_jax.configs')
        for folder in (spec.submodule_search_locations or []) if spec else []:
          bundled = os.path.join(folder, path[len('configs/'):])
          if os.path.exists(bundled):
            arg = f'--config={bundled}{sep}{variant}'
            break
    out.append(arg)
  return out


def parse_flags(argv):
  """absl's parser, but a bad flag or config key is one line and exit 2."""
  argv = bundled_config(argv)
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections reports an unknown key as KeyError("'k'\nDid you mean ...") and a
    # failing config file with its whole traceback: keep the informative last part.
    lines = [l.strip() for l in str(e).replace('\\n', '\n').splitlines() if l.strip()]
    if any('Traceback' in l for l in lines):
      lines = [lines[0].split(':')[0], lines[-1]]
    text = ' '.join(' '.join(lines).replace('\\', '').replace("'", '').replace('"', '').split())
    culprit = next((a for a in argv[1:] if a.startswith('--config.') and any(
        part and part in a for part in text.split()[:1])), '')
    where = f' in {culprit.split("=")[0]}' if culprit else ''
    _fail(f'bad flag or config key{where} ({text or type(e).__name__}): fix the name or value '
          '(config keys are listed in bnsynth_jax/config_lib.py; flags in --helpfull)')


def main(argv):
  from bnsynth_jax import metrics
  metrics.quiet_library_logs()
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])}: flags are written --name=value')
  try:
    config = FLAGS.config
    if config is None:
      _fail('--config is required: e.g. --config=configs/digits.py')
    config.get('seed')   # config_flags reports a missing file only on first access
  except OSError as e:
    detail = ' '.join(str(e).split())
    _fail(f'cannot load the --config file ({detail}): pass the path of a config file, e.g. '
          '--config=configs/digits.py')
  if not FLAGS.workdir:
    _fail('--workdir is required: the folder where the run writes its artifacts')
  signal.signal(signal.SIGTERM, _on_sigterm)
  resume = ('run the same command again to resume (finished stages are kept; the current one '
            'continues from its last checkpoint)')
  try:
    import jax
    from bnsynth_jax import parallel, pipeline
    if FLAGS.distributed:
      parallel.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes,
                                      FLAGS.process_id, FLAGS.cpu_collectives)
    logging.info('JAX process %d/%d, local devices %s', jax.process_index(),
                 jax.process_count(), jax.local_devices())
    pipeline.run(config, FLAGS.workdir, FLAGS.stages, FLAGS.overwrite)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _stop(f'interrupted (Ctrl-C): {resume}', 130)
  except Terminated:
    _stop(f'terminated (SIGTERM): {resume}', 143)
  except Exception as e:  # noqa: BLE001 -- environment faults become one line; others re-raise
    message = fault_message(e, FLAGS.workdir)
    if message is None:
      raise
    _stop(message, 1)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
