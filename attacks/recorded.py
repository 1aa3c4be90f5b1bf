"""Attacks on what a real run's server observed (``privfl attack --run RUN_DIR``).

A run made with ``record=True`` (``privfl run --record``) keeps the bytes the server received, sent
and relayed (:mod:`privfl.recording`). This module decodes them as the server would and attacks what
it can read, with the public facts a server knows: the global model of the round (rebuilt from the
run's checkpoints and checked against the hash recorded with the round), each site's example count,
sample rate and local steps (summary.json) and the learning rates (run.json).

What the server can read depends on the protection the run used:

- plaintext: every site's FedAvg update, which is attacked per site;
- CKKS: ciphertexts (no access) until the key holder releases the average;
- shared key: ciphertexts (no access) until the sites decrypt the sum;
- secure aggregation: masked vectors (no access) until the sum is unmasked.

Under every protection the server learns the round's average, the change of the global model, which
is attacked as an aggregate of the contributing sites' data.

Each reconstruction is scored against the true training examples of the site (or of every
contributing site, for the aggregate): the attacker does not know which examples were sampled, so
every reconstruction is matched to the example it resembles most, and the verdict compares that match
with the dataset-mean guess's best match.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from privfl.errors import AttackError, ConfigError, MessageError
from privfl.recording import RecordedRound, load_server_view, parameters_digest

from .analytic import AnalyticLinear
from .base import Attack, GradientObservation, Observation, UpdateObservation
from .evaluate import score
from .fedavg import FedAvgInversion
from .metrics import best_match, chance_baseline

__all__ = ["RecordedAttackResult", "RecordedAttackRow", "attack_recording", "write_recorded_results"]

PLAINTEXT_UPDATE = "plaintext update"
CIPHERTEXT = "CKKS ciphertext"
SHARED_KEY_CIPHERTEXT = "shared-key ciphertext"
MASKED = "masked vector"
AGGREGATE = "round average"


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordedAttackRow:
    """One attack on one thing the server observed in one round.

    Attributes:
        round: the round.
        source: the site whose message it was, or ``"aggregate"`` for the round's average.
        view: what the server held (``"plaintext update"``, ``"CKKS ciphertext"``, ``"shared-key ciphertext"``,
            ``"masked vector"``, ``"round average"``).
        attack: the attack's name, or ``"-"`` when the server had nothing to attack.
        num_examples: the training examples behind the observation (public: the FedAvg weights).
        reconstructed: inputs the attack returned (0 with no access or when skipped).
        psnr: mean PSNR (dB) of the reconstructions against the true examples they match best.
        best_psnr: the best single match; ``best_chance_psnr`` is the dataset-mean guess's best match.
        max_abs_error: the largest feature error of the matched reconstructions.
        exact: reconstructions within ``exact_tolerance`` of a true example in every feature.
        verdict: ``"recovered"`` (best match above chance by the margin, or an exact input), ``"not
            recovered"``, ``"no access"`` or ``"skipped"``.
        note: why there was no access or the attack was skipped, or the attack's own remark.
    """

    round: int
    source: str
    view: str
    attack: str
    num_examples: int
    reconstructed: int = 0
    psnr: float = math.nan
    best_psnr: float = math.nan
    best_chance_psnr: float = math.nan
    max_abs_error: float = math.nan
    exact: int = 0
    verdict: str = "no access"
    note: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordedAttackResult:
    """All rows of :func:`attack_recording`, with the run it attacked and the protection it used."""

    run_dir: Path
    protection: str
    rows: tuple[RecordedAttackRow, ...]

    @property
    def recovered(self) -> tuple[RecordedAttackRow, ...]:
        """The rows whose verdict is ``"recovered"``."""
        return tuple(r for r in self.rows if r.verdict == "recovered")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN as None)."""
        rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(r).items()}
                for r in self.rows]
        return {"run_dir": str(self.run_dir), "protection": self.protection, "rows": rows}

    def to_markdown(self) -> str:
        """A table of every row."""
        lines = [
            f"# Attacks on what the server observed in {self.run_dir}",
            "",
            f"Protection: {self.protection}. {len(self.recovered)} of {len(self.rows)} observations recovered.",
            "",
            "| round | source | server view | attack | examples | reconstructed | exact | PSNR dB | best / chance dB "
            "| max abs error | verdict | note |",
            "|---:|---|---|---|---:|---:|---:|---:|---|---:|---|---|",
        ]
        for r in self.rows:
            best = f"{_num(r.best_psnr)} / {_num(r.best_chance_psnr)}" if math.isfinite(r.best_psnr) else "-"
            lines.append(
                f"| {r.round} | {r.source} | {r.view} | {r.attack} | {r.num_examples} | {r.reconstructed} | {r.exact} "
                f"| {_num(r.psnr)} | {best} | {_sci(r.max_abs_error)} | {r.verdict} | {r.note.replace('|', '/')} |"
            )
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "-"


def _sci(value: float) -> str:
    return f"{value:.2e}" if math.isfinite(value) else "-"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(path.name, str(path), f"cannot be read: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the server knows about the run, from its own files."""

    protection: str
    learning_rate: float
    server_learning_rate: float
    sites: Mapping[str, Mapping[str, Any]]
    history: Sequence[Mapping[str, Any]]


def _facts(run: Path) -> _Facts:
    from privfl.rundir import HISTORY_FILE, RUN_FILE, SUMMARY_FILE, load_history, load_run_identity

    if not (run / SUMMARY_FILE).is_file():
        raise ConfigError("run", str(run), "has no summary.json: attack a run's recording once the run has finished")
    identity = load_run_identity(run / RUN_FILE)
    summary = _read_json(run / SUMMARY_FILE)
    clients = summary.get("clients") if isinstance(summary, dict) else None
    if not isinstance(clients, dict):
        raise ConfigError(SUMMARY_FILE, str(run / SUMMARY_FILE), "has no 'clients' table")
    return _Facts(
        protection=str(identity["federation"].get("protection", "plaintext")),
        learning_rate=float(identity["training"]["learning_rate"]),
        server_learning_rate=float(identity["federation"].get("server_learning_rate", 1.0)),
        sites=clients,
        history=load_history(run / HISTORY_FILE),
    )


def _inputs(dataset: Dataset, model: nn.Module, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    from privfl.training import prepare_dataset

    prepared = prepare_dataset(dataset, model, site=site)
    xs, ys = zip(*(prepared[i] for i in range(len(prepared))), strict=True)  # type: ignore[arg-type]
    return torch.stack([torch.as_tensor(x) for x in xs]).double(), torch.stack([torch.as_tensor(y) for y in ys]).long()


def _global_models(
    run: Path, rounds: list[RecordedRound], model_fn: Callable[[], nn.Module]
) -> tuple[nn.Module, dict[int, np.ndarray]]:
    """The model and the global parameters each recorded round started from and ended with."""
    from privfl.export import initial_run_model
    from privfl.rundir import RUN_FILE, load_checkpoint, load_run_identity
    from privfl.training import flatten_parameters

    model, _ = initial_run_model(model_fn, load_run_identity(run / RUN_FILE))
    dim = len(flatten_parameters(model))
    params: dict[int, np.ndarray] = {}
    for recorded in rounds:
        r = recorded.round
        if recorded.dim != dim:
            raise ConfigError("model_fn", type(model).__name__, f"has {dim} parameters; round {r} was recorded with {recorded.dim}")
        start = flatten_parameters(model) if r == 0 else load_checkpoint(run, r - 1, dim)
        if parameters_digest(start) != recorded.global_sha256:
            raise ConfigError(
                "run", str(run), f"round {r}'s global model does not match its recording (another model_fn, or the "
                "checkpoints changed since the run)"
            )
        params[r] = start
        params[r + 1] = load_checkpoint(run, r, dim)
    return model, params


def _tensors(model: nn.Module, flat: np.ndarray) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in model.parameters():
        if p.requires_grad:
            n = p.numel()
            out.append(torch.as_tensor(np.asarray(flat[offset : offset + n], dtype=np.float64)).reshape(p.shape))
            offset += n
    return out


def _loaded(model: nn.Module, flat: np.ndarray) -> nn.Module:
    from privfl.training import load_flat_parameters

    load_flat_parameters(model, flat.astype(np.float32))
    return model.double()


@dataclass(frozen=True, slots=True)
class _Target:
    round: int
    source: str
    view: str
    num_examples: int
    delta: np.ndarray | None  # None: no access
    steps: int
    batch_size: int
    inputs: torch.Tensor
    labels: torch.Tensor
    note: str = ""


def _observations(
    recorded: RecordedRound, facts: _Facts, truth: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    params: Mapping[int, np.ndarray],
) -> list[_Target]:
    from privfl.protocols.plaintext import decode_update

    r = recorded.round
    targets = []
    for message in recorded.messages:
        site = message.sender
        if message.receiver != "server" or site not in truth or message.step not in ("update", "masked_input"):
            continue
        plan = facts.sites.get(site, {})
        n = int(plan.get("num_examples", len(truth[site][1])))
        steps = int(plan.get("steps_per_round", 1))
        batch = max(1, min(n, round(float(plan.get("sample_rate", 1.0)) * n)))
        base = _Target(round=r, source=site, view=PLAINTEXT_UPDATE, num_examples=n, delta=None, steps=steps,
                       batch_size=batch, inputs=truth[site][0], labels=truth[site][1])
        if message.step == "masked_input":
            targets.append(replace(base, view=MASKED, note="one-time-padded with pairwise and self masks"))
        elif facts.protection == "ckks":
            targets.append(replace(base, view=CIPHERTEXT, note="encrypted under the key holder's key"))
        elif facts.protection == "shared_key":
            targets.append(replace(base, view=SHARED_KEY_CIPHERTEXT, note="encrypted under the sites' shared key (the server holds none)"))
        else:
            try:
                _, delta = decode_update(message.payload, round_index=r, sender=site, dim=recorded.dim)
            except MessageError as exc:
                targets.append(replace(base, note=f"undecodable: {exc.reason}"))
                continue
            targets.append(replace(base, delta=delta.astype(np.float64)))
    record = next((h for h in facts.history if h.get("round") == r), None)
    contributors = [c for c in (record or {}).get("contributors", []) if c in truth]
    if contributors:
        average = (params[r + 1].astype(np.float64) - params[r].astype(np.float64)) / facts.server_learning_rate
        n = sum(int(facts.sites.get(c, {}).get("num_examples", len(truth[c][1]))) for c in contributors)
        steps = max(int(facts.sites.get(c, {}).get("steps_per_round", 1)) for c in contributors)
        targets.append(_Target(
            round=r, source="aggregate", view=AGGREGATE, num_examples=n, delta=average, steps=steps, batch_size=n,
            inputs=torch.cat([truth[c][0] for c in contributors]), labels=torch.cat([truth[c][1] for c in contributors]),
            note=f"average of {len(contributors)} site(s)",
        ))
    return targets


@dataclass(frozen=True, slots=True)
class _Judge:
    """How reconstructions are scored: the chance guess, the data's range and the verdict's thresholds."""

    baseline: torch.Tensor
    data_range: float
    margin_db: float
    exact_tolerance: float


def _run_attack(attack: Attack, model: nn.Module, target: _Target, observation: Observation, judge: _Judge) -> RecordedAttackRow:
    baseline, data_range = judge.baseline, judge.data_range
    margin_db, exact_tolerance = judge.margin_db, judge.exact_tolerance
    row = _row(target, attack.name)
    try:
        reconstruction = attack.reconstruct(model, observation)
    except AttackError as exc:
        return replace(row, verdict="skipped", note=str(exc))
    rec = reconstruction.inputs.double()
    # Each reconstruction against the true example it resembles most: which examples the site
    # sampled is not observable.
    match = best_match(rec, target.inputs, data_range=data_range)
    chosen = match.target_index
    result = score(reconstruction, target.inputs[chosen], target.labels[chosen], baseline=baseline, data_range=data_range)
    errors = (rec.reshape(len(rec), 1, -1) - target.inputs.reshape(1, len(target.inputs), -1)).abs().amax(dim=2)
    exact = int((errors.min(dim=1).values <= exact_tolerance).sum())
    recovered = exact > 0 or result.best_psnr > result.best_chance_psnr + margin_db
    return replace(
        row, reconstructed=len(rec), psnr=result.psnr, best_psnr=result.best_psnr,
        best_chance_psnr=result.best_chance_psnr, max_abs_error=result.max_abs_error, exact=exact,
        verdict="recovered" if recovered else "not recovered", note=reconstruction.note,
    )


def _row(target: _Target, attack: str) -> RecordedAttackRow:
    return RecordedAttackRow(round=target.round, source=target.source, view=target.view, attack=attack,
                             num_examples=target.num_examples)


def attack_recording(
    run_dir: str | os.PathLike[str],
    *,
    model_fn: Callable[[], nn.Module],
    clients: Mapping[str, Dataset],
    rounds: Sequence[int] | None = None,
    iterations: int = 300,
    max_samples: int = 16,
    margin_db: float = 3.0,
    exact_tolerance: float = 1e-3,
    seed: int = 0,
    on_row: Callable[[RecordedAttackRow], None] | None = None,
) -> RecordedAttackResult:
    """Attacks every observation recorded in ``run_dir`` (made with ``record=True``).

    For each site's update the server could read, and for each round's average: the analytic attack
    on the first linear layer (the update read as one gradient step, ``-delta / (lr * steps)``) and,
    when at most ``max_samples`` examples are behind it, FedAvg-update inversion replaying the
    site's local steps with labels estimated from the update. Ciphertexts and masked vectors are
    rows with verdict ``"no access"``.

    Args:
        run_dir: the run directory (or a ``privfl deploy local`` directory: its ``run/``).
        model_fn: builds the run's model (as for :func:`privfl.load_model`); checked against the
            global model recorded with every round.
        clients: site name -> its training Dataset, the ground truth the reconstructions are scored
            against (the attacker never sees it).
        rounds: the rounds to attack (default: every recorded round).
        iterations: FedAvg-inversion optimizer steps.
        max_samples: largest number of examples behind an update that inversion is tried on.
        margin_db: "recovered" means a best match this far above the dataset-mean guess's ...
        exact_tolerance: ... or a reconstruction within this of a true example in every feature.
        seed: seeds the inversion's random starts.
        on_row: called with every row as it is finished (progress).

    Raises:
        ConfigError: no recording, a recording or checkpoint that does not match the model, an
            unfinished run, or a round that was not recorded.
    """
    from privfl.audit.deployment import server_run_dir

    run = server_run_dir(run_dir)
    if not run.is_dir():
        raise ConfigError("run_dir", str(run), "is not a directory")
    for name, value in (("iterations", iterations), ("max_samples", max_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, value, "must be a positive int")
    recorded = load_server_view(run)
    facts = _facts(run)
    if rounds is not None:
        wanted = set(rounds)
        missing = wanted - {r.round for r in recorded}
        if missing:
            raise ConfigError("rounds", sorted(missing), f"not recorded in {run}; recorded: {[r.round for r in recorded]}")
        recorded = [r for r in recorded if r.round in wanted]
    model, params = _global_models(run, recorded, model_fn)
    unknown = sorted(set(facts.sites) - set(clients))
    if unknown:
        raise ConfigError("clients", sorted(clients), f"lacks the run's sites {unknown}: their data is the ground truth")
    truth = {name: _inputs(clients[name], model, name) for name in facts.sites}
    everything = torch.cat([x for x, _ in truth.values()])
    baseline = chance_baseline(everything)
    data_range = float(everything.max() - everything.min()) or 1.0
    input_shape = tuple(everything.shape[1:])
    rows: list[RecordedAttackRow] = []

    def emit(row: RecordedAttackRow) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for rec in recorded:
        for target in _observations(rec, facts, truth, params):
            if target.delta is None:
                emit(replace(_row(target, "-"), note=target.note))
                continue
            start = _loaded(model, params[target.round])
            update = _tensors(start, target.delta)
            shown = min(target.num_examples, max_samples)
            scale = facts.learning_rate * target.steps
            gradient = GradientObservation(input_shape=input_shape, num_samples=shown,
                                           gradients=tuple(-u / scale for u in update))
            judge = _Judge(baseline=baseline, data_range=data_range, margin_db=margin_db, exact_tolerance=exact_tolerance)
            emit(_run_attack(AnalyticLinear(), start, target, gradient, judge))
            if target.num_examples > max_samples:
                emit(replace(_row(target, FedAvgInversion.name), verdict="skipped",
                             note=f"{target.num_examples} examples behind it > max_samples {max_samples}"))
                continue
            observation = UpdateObservation(
                input_shape=input_shape, num_samples=target.num_examples, delta=tuple(update), local_steps=target.steps,
                lr=facts.learning_rate, batch_size=min(target.batch_size, target.num_examples),
            )
            inversion = FedAvgInversion(max_iterations=iterations, seed=seed)
            emit(_run_attack(inversion, _loaded(model, params[target.round]), target, observation, judge))
    return RecordedAttackResult(run_dir=run, protection=facts.protection, rows=tuple(rows))


def write_recorded_results(result: RecordedAttackResult, out: str | os.PathLike[str]) -> Path:
    """Writes ``results.json`` and ``results.md`` into ``out`` (created); returns the folder."""
    from privfl.rundir import durable_write_bytes, durable_write_json

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    durable_write_json(folder / "results.json", result.to_dict())
    durable_write_bytes(folder / "results.md", result.to_markdown().encode())
    return folder
