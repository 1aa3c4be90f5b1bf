"""Five hospitals train a diagnostic model on breast-cancer data with DP-SGD and CKKS-encrypted averaging.

The model below is an ordinary torch.nn.Module, and each hospital's data an ordinary Dataset: this
is how you bring your own. Run:

    python examples/healthcare_breast_cancer.py --out runs/healthcare
"""

from __future__ import annotations

import argparse

from torch import nn

from privfl import DPConfig, Federation, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import dirichlet_partition, labels_of, load_breast_cancer, subsets


class RiskModel(nn.Module):
    """A small two-layer network on the 30 tumour measurements."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.layers(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="run directory (default: keep results in memory)")
    parser.add_argument("--protection", choices=[p.value for p in ProtectionKind], default="ckks")
    parser.add_argument("--epsilon", type=float, default=3.0)
    args = parser.parse_args()

    data = load_breast_cancer(seed=0)
    parts = dirichlet_partition(labels_of(data.train), 5, alpha=0.5, seed=0, min_size=20)
    hospitals = dict(zip([f"hospital-{c}" for c in "abcde"], subsets(data.train, parts), strict=True))

    federation = Federation(
        model_fn=RiskModel,
        clients=hospitals,
        test_set=data.test,
        training=TrainingConfig(batch_size=16, learning_rate=0.5, dp=DPConfig(target_epsilon=args.epsilon, delta=1e-5)),
        federation=FederationConfig(rounds=10, protection=ProtectionKind(args.protection)),
    )
    result = federation.run(args.out)
    print(f"test accuracy {result.summary['final_accuracy']:.3f}")
    for name, info in result.summary["clients"].items():
        print(f"  {name}: {info['num_examples']:4d} patients, epsilon {info['epsilon']:.2f} (delta {info['delta']:g})")


if __name__ == "__main__":
    main()
