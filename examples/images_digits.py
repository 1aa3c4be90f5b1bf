"""Ten clients with label-skewed handwritten digits train a small CNN with DP-SGD.

Run:

    python examples/images_digits.py --rounds 15 --out runs/digits
"""

from __future__ import annotations

import argparse

from privfl import DPConfig, Federation, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import dirichlet_partition, labels_of, load_digits, subsets
from privfl.models import SmallCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--protection", choices=[p.value for p in ProtectionKind], default="ckks")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()

    data = load_digits(seed=0)
    parts = dirichlet_partition(labels_of(data.train), 10, alpha=args.alpha, seed=0, min_size=40)
    clients = {f"client-{i}": s for i, s in enumerate(subsets(data.train, parts))}

    federation = Federation(
        model_fn=lambda: SmallCNN(10),
        clients=clients,
        test_set=data.test,
        training=TrainingConfig(batch_size=32, learning_rate=0.5, momentum=0.5, dp=DPConfig(target_epsilon=args.epsilon, max_grad_norm=1.0)),
        federation=FederationConfig(rounds=args.rounds, client_fraction=0.5, protection=ProtectionKind(args.protection)),
    )
    result = federation.run(args.out)
    print(f"test accuracy {result.summary['final_accuracy']:.3f}; "
          f"largest epsilon {max(c['epsilon'] for c in result.summary['clients'].values()):.2f}")


if __name__ == "__main__":
    main()
