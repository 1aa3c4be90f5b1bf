"""Helpers shared by the tests of the Site and Aggregator roles (imported by module name, as pytest puts tests/ on the path)."""

from __future__ import annotations

from privfl.aggregator import Aggregator
from privfl.federation import Federation
from privfl.models import build_model
from privfl.site import Site, SiteRole, _parse_config, site_identity


def make_sites(clients, root, *, budget: float | None = None, budgets: dict[str, float] | None = None) -> list[Site]:
    """One Site per client under ``root``; the first holds the CKKS key, and the others its identity
    key (handed over out of band, as a consortium does). ``budgets`` overrides ``budget`` per site.
    They accept the test configs' ``noise_seed`` (the tests compare with ``privfl run`` for the same seeds)."""
    key_holder_key = site_identity(root / next(iter(clients)))
    return [
        Site(name, dataset, root / name, role=SiteRole.KEY_HOLDER if i == 0 else SiteRole.SITE,
             budget=(budgets or {}).get(name, budget), key_holder_key=key_holder_key, allow_noise_seed=True)
        for i, (name, dataset) in enumerate(clients.items())
    ]


def make_aggregator(text: str, split, **kwargs) -> Aggregator:
    """The Aggregator of ``text`` for the split's model, evaluating on its test set, without a progress bar."""
    return Aggregator(text, input_shape=split.train.input_shape, num_classes=split.train.num_classes, test_set=split.test,
                      progress=False, **kwargs)


def run_in_process(text: str, split, clients):
    """The same federation run in one process (Federation), for comparison."""
    cfg = _parse_config(text)
    return Federation(
        model_fn=lambda: build_model(cfg.model, split.train.input_shape, split.train.num_classes),
        clients=clients, test_set=split.test, training=cfg.training, federation=cfg.federation, progress=False,
    ).run()
