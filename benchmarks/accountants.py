"""What a discrete-Gaussian statistics mechanism would cost in epsilon (docs/privacy.md, "The
noise sampler").

  python benchmarks/accountants.py [--train_examples=digits_dp:1437,cifar10_cpu_dp:5000]

The discrete Gaussian (Canonne, Kamath, Steinke 2020) is the sampler without floating-point
leaks, but its guarantee is zero-concentrated DP (rho = 1 / (2 sigma^2) for L2 sensitivity 1,
in any dimension), not the continuous Gaussian's privacy loss distribution that the PLD
accountant composes: dp-accounting's PLD accountant takes no zCDP event, so a plan with it
must be composed by the RDP accountant. For each shipped DP default and epsilon, this prints
the epsilon the plan reports (PLD, continuous Gaussian) and the epsilon of the same noise
multipliers composed by RDP with the statistics as a zCDP event (what the discrete sampler
would be charged).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import dp_accounting  # noqa: E402

from bnsynth_jax import privacy  # noqa: E402
from quality import load_config  # noqa: E402

CONFIGS = {'digits_dp': 'configs/digits_dp.py', 'cifar10_cpu_dp': 'configs/cifar10.py:cpu_dp'}


def rdp_epsilon(record: dict, delta: float) -> float:
  t, s = record['teacher'], record['stats']
  accountant = dp_accounting.rdp.RdpAccountant()
  if 'steps' in t:
    accountant.compose(privacy.teacher_event(t['noise_multiplier'], t['batch_size'],
                                             t['accounted_examples'], t['steps']))
  else:
    accountant.compose(dp_accounting.ZCDpEvent(rho=0.5 / t['noise_multiplier'] ** 2))
  accountant.compose(dp_accounting.ZCDpEvent(rho=0.5 / s['noise_multiplier'] ** 2))
  return float(accountant.get_epsilon(delta))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--train_examples', default='digits_dp:1437,cifar10_cpu_dp:5000')
  args = parser.parse_args()
  print('| config | requested epsilon | teacher mechanism | PLD (continuous Gaussian) | '
        'RDP, statistics as zCDP (discrete Gaussian) |')
  print('|---|---|---|---|---|')
  for item in args.train_examples.split(','):
    name, n = item.split(':')
    for epsilon in (8.0, 3.0, 1.0):
      config = load_config(CONFIGS[name])
      config.privacy.epsilon = epsilon
      record = privacy.plan(config, int(n))
      kind = 'DP-SGD' if 'steps' in record['teacher'] else 'class-means head'
      print(f"| {name} | {epsilon:g} | {kind} | {record['epsilon']:.3f} | "
            f"{rdp_epsilon(record, record['delta']):.3f} |")


if __name__ == '__main__':
  main()
