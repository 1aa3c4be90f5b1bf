"""Five regional bank branches train a credit-default model; each region is one client.

The data is GENERATED (privfl.data.make_credit): synthetic applicants with plausible features,
not real customers. Run:

    python examples/finance_credit.py --protection ckks --out runs/credit
"""

from __future__ import annotations

import argparse

from privfl import DPConfig, Federation, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import group_partition, make_credit, subsets
from privfl.models import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--protection", choices=[p.value for p in ProtectionKind], default="ckks")
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    data = make_credit(num_rows=6000, seed=0)
    regions = group_partition(data.train.groups)
    branches = dict(zip(regions, subsets(data.train, list(regions.values())), strict=True))

    federation = Federation(
        model_fn=lambda: MLP(8, 2, hidden=32),
        clients=branches,
        test_set=data.test,
        training=TrainingConfig(batch_size=64, learning_rate=1.0, dp=DPConfig(target_epsilon=args.epsilon)),
        federation=FederationConfig(rounds=args.rounds, protection=ProtectionKind(args.protection)),
    )
    result = federation.run(args.out)
    base_rate = 1 - float(data.test.targets.float().mean())
    print(f"test accuracy {result.summary['final_accuracy']:.3f} (always predicting 'no default': {base_rate:.3f})")
    for name, info in result.summary["clients"].items():
        print(f"  branch {name}: {info['num_examples']} applicants, epsilon {info['epsilon']:.2f}")


if __name__ == "__main__":
    main()
