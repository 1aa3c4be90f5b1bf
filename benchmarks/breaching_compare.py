"""Compares privfl's attacks with breaching's Inverting Gradients on the photograph scenario set, per crop set.

Both attacks get the same model weights, the same observation (one-step gradient or FedAvg update), the same
label knowledge and the same number of iterations (one restart each); both reconstructions are scored the same
way, by ``privfl.attacks.metrics.best_match`` (mean PSNR over the best one-to-one matching, pixels in [0, 1]).

breaching (the reference implementation of Geiping et al. 2020, ``pip install breaching``) is optional. When it
does not import, the breaching columns are skipped with a one-line message and privfl's own figures are still
printed. Its PyPI dependencies pull torchvision, whose PyPI wheel is linked against the CUDA build of torch; see
docs/attacks.md ("Against breaching") for an installation in a separate virtual environment next to a CPU torch.

Run from the repository root:

    python benchmarks/breaching_compare.py --iterations 500 --crop-sets 8 --threads 1

``--scenarios 32`` (32x32 crops) and ``--scenarios trained`` (a briefly trained ReLU ConvNet) run the further
scenarios; ``--no-tv0`` skips the TV-0 sensitivity column. ``--seeds 0 1 2`` runs both attacks from each seed and
scores each crop set by the mean over them, printing the spread between seeds (single runs can move by several dB
with the seed or the machine; docs/attacks.md, "One seed on one machine"); ``--case FedAvg`` runs only the cases
whose label contains that text. ``--privfl-restarts 3`` gives privfl's attack three restarts (the lowest final
objective wins) against breaching's one: not an equal budget, a measure of how much of privfl's spread a user
removes by raising ``restarts`` (docs/attacks.md, "Limitations").

(``python benchmarks/attacks_quality.py --breaching`` runs the same.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import torch
from attacks_quality import PhotoCase, photo_model, photo_observation, photo_victims

from privfl.attacks import (
    Attack,
    FedAvgInversion,
    GradientObservation,
    InvertingGradients,
    UpdateObservation,
)
from privfl.attacks.metrics import best_match

# The scenario set, fixed before any breaching run: one image and a batch of 4 through a one-step gradient,
# and 4 images over 4 local steps of batch 2 (lr 0.1), on the ReLU and the sigmoid photo_convnet.
# breaching replays FedAvg updates only when the client also reports each local step's labels
# (its ``local_update`` user with ``provide_local_hyperparams``), so its FedAvg case is "labels known".
# The FedAvg case with labels estimated from the update has no breaching counterpart and runs privfl alone.
COMPARE_CASES: tuple[PhotoCase, ...] = tuple(
    case
    for activation in ("relu", "sigmoid")
    for case in (
        PhotoCase("gradient, 1 image", 1, None, 1, activation=activation),
        PhotoCase("gradient, batch 4", 4, None, 4, activation=activation),
        PhotoCase("FedAvg 4 images, 4 steps of batch 2, lr 0.1, labels known", 4, 4, 2, labels_known=True,
                  activation=activation),
        PhotoCase("FedAvg 4 images, 4 steps of batch 2, lr 0.1, labels estimated", 4, 4, 2, activation=activation),
    )
)


def _comparable(activation: str, *, size: int = 16, train_steps: int = 0) -> tuple[PhotoCase, ...]:
    """The three cases breaching can express: one image, a batch of 4, the FedAvg update with labels known."""
    kw = {"activation": activation, "size": size, "train_steps": train_steps}
    return (
        PhotoCase("gradient, 1 image", 1, None, 1, **kw),  # type: ignore[arg-type]
        PhotoCase("gradient, batch 4", 4, None, 4, **kw),  # type: ignore[arg-type]
        PhotoCase("FedAvg 4 images, 4 steps of batch 2, lr 0.1, labels known", 4, 4, 2,
                  labels_known=True, **kw),  # type: ignore[arg-type]
    )


# Further scenarios, fixed before their runs: 32x32 crops (zoom 4, so 128x128 pixels of the photograph
# each) through the untrained ReLU and sigmoid photo_convnet(size=32), and 16x16 crops through the ReLU
# photo_convnet after 300 SGD steps on other crops (trained_photo_convnet: which photograph, which quadrant;
# the victims keep their true classes). Only the cases breaching can express.
SCENARIO_SETS: dict[str, tuple[PhotoCase, ...]] = {
    "base": COMPARE_CASES,
    "32": _comparable("relu", size=32) + _comparable("sigmoid", size=32),
    "trained": _comparable("relu", train_steps=300),
}

# A torch.library handle that must outlive the import of torchvision (see load_breaching).
_torchvision_schemas: list[torch.library.Library] = []


def load_breaching() -> tuple[ModuleType | None, str]:
    """Imports breaching, or says why it cannot be imported.

    torchvision's PyPI wheel is built against the CUDA torch; next to a CPU torch its compiled operators do
    not load, which torchvision tolerates except for registering fake kernels of ``nms`` and ``qnms``. When
    the import fails on exactly that, the two operator schemas are declared (no kernels: nothing here calls
    them) and the import is retried.

    Returns:
        The module and an empty string, or ``None`` and the reason.
    """
    if importlib.util.find_spec("breaching") is None:
        return None, "No module named 'breaching'"
    try:
        return importlib.import_module("breaching"), ""
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            return None, f"{type(exc).__name__}: {exc}"
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "breaching", "lpips")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schemas.append(library)
    try:
        return importlib.import_module("breaching"), ""
    except Exception as exc:  # any failure of an optional import means "skip its columns"
        return None, f"{type(exc).__name__}: {exc}"


@dataclass
class BreachingRunner:
    """breaching's ``invertinggradients`` attack config, only ``optim.max_iterations`` (and overrides) changed."""

    module: ModuleType
    iterations: int
    overrides: tuple[str, ...] = ()
    _config: object = field(default=None, init=False, repr=False)

    def config(self) -> object:
        if self._config is None:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # hydra's version_base notice
                self._config = self.module.get_attack_config(
                    "invertinggradients", overrides=[f"optim.max_iterations={self.iterations}", *self.overrides]
                )
        return self._config

    def reconstruct(self, model: torch.nn.Module, obs: GradientObservation | UpdateObservation,
                    *, seed: int) -> torch.Tensor:
        """breaching's reconstruction from what the server observed, pixels in [0, 1]."""
        from omegaconf import OmegaConf  # a dependency of breaching (through hydra)

        # mean 0, std 1: breaching optimizes in the model's input space, which is pixel space here, and its box
        # projection is then [0, 1], the same box privfl's attacks use.
        metadata = OmegaConf.create({"shape": list(obs.input_shape), "mean": [0.0] * obs.input_shape[0],
                                     "std": [1.0] * obs.input_shape[0], "modality": "vision", "classes": 10})
        payload = {"parameters": [p.detach().clone() for p in model.parameters()], "buffers": None,
                   "metadata": metadata}
        labels = None if obs.labels is None else obs.labels.sort().values
        if isinstance(obs, UpdateObservation):
            if obs.labels is None:
                raise ValueError("breaching replays a FedAvg update only with each local step's labels")
            n = obs.num_samples
            per_step = [obs.labels[torch.tensor([(k * obs.batch_size + j) % n for j in range(obs.batch_size)])]
                        .sort().values for k in range(obs.local_steps)]
            hyperparams = {"lr": obs.lr, "steps": obs.local_steps, "data_per_step": obs.batch_size,
                           "labels": per_step}
            shared = [t.clone() for t in obs.delta]
        else:
            hyperparams = None
            shared = [t.clone() for t in obs.gradients]
        user = {"gradients": shared, "buffers": None,
                "metadata": {"num_data_points": obs.num_samples, "labels": labels, "local_hyperparams": hyperparams}}
        attacker = self.module.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), self.config(),
                                                      {"device": torch.device("cpu"), "dtype": torch.float})
        torch.manual_seed(seed)  # breaching draws its random start from the global generator
        reconstruction, _ = attacker.reconstruct([payload], [user], {}, dryrun=False)
        return reconstruction["data"].detach().float()


def privfl_attack(case: PhotoCase, iterations: int, seed: int = 0, restarts: int = 1) -> Attack:
    """privfl's attack for the observation: Inverting Gradients for a gradient, FedAvgInversion for an update."""
    if case.local_steps is None:
        return InvertingGradients(max_iterations=iterations, seed=seed, restarts=restarts)
    return FedAvgInversion(max_iterations=iterations, seed=seed, restarts=restarts)


@dataclass
class CaseResult:
    """One case's PSNRs per crop set: each the mean over the seeds run (``runs`` keeps every seed's value)."""

    case: PhotoCase
    privfl: list[float] = field(default_factory=list)
    breaching: list[float] = field(default_factory=list)
    breaching_tv0: list[float] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    runs: dict[str, list[list[float]]] = field(default_factory=dict)

    def time(self, key: str, seconds: float) -> None:
        self.seconds.setdefault(key, []).append(seconds)

    def add(self, key: str, values: list[float]) -> None:
        """Records one crop set's values of ``key`` (one per seed) and their mean."""
        self.runs.setdefault(key, []).append(values)
        getattr(self, key).append(statistics.fmean(values))

    def seed_spread(self, key: str) -> list[float]:
        """Per crop set, the largest minus the smallest value over the seeds."""
        return [max(v) - min(v) for v in self.runs.get(key, [])]


def timed_psnr(reconstruct, x: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    inputs = reconstruct()
    seconds = time.perf_counter() - start
    return float(best_match(inputs.float(), x, data_range=1.0).psnr.mean()), seconds


def compare(*, iterations: int, crop_sets: int, cases: tuple[PhotoCase, ...] = COMPARE_CASES,
            tv0: bool = True, seeds: tuple[int, ...] = (0,), restarts: int = 1) -> list[CaseResult]:
    """Runs privfl and (when importable) breaching on every case, crop set and seed; prints one line per run.

    ``restarts`` is privfl's (breaching always runs one).

    ``tv0=False`` skips the sensitivity runs of breaching with its TV prior off (their column then reads —).
    Each seed seeds both attacks' random starts (privfl's ``seed`` argument, breaching's global generator); the
    models, crops and observations do not depend on it. A crop set's figure is the mean over the seeds.
    """
    module, reason = load_breaching()
    if module is None:
        print(f"breaching columns skipped: breaching is not importable ({reason}); see docs/attacks.md")
    runners = {} if module is None else {
        "breaching": BreachingRunner(module, iterations),
        "breaching_tv0": BreachingRunner(module, iterations, ("regularization.total_variation.scale=0",)),
    }
    if not tv0:
        runners.pop("breaching_tv0", None)
    notes: dict[str, str] = {}
    results = []
    for case in cases:
        model, note = photo_model(case)
        if note and notes.setdefault(case.model_label, note) is note:
            print(f"  {case.model_label}: {note}", flush=True)
        result = CaseResult(case)
        for crop_set in range(crop_sets):
            x, y = photo_victims(case, crop_set)
            obs = photo_observation(model, x, y, case)
            values: dict[str, list[float]] = {}
            for seed in seeds:
                attack = privfl_attack(case, iterations, seed, restarts)
                value, seconds = timed_psnr(lambda: attack.reconstruct(model, obs).inputs, x)  # noqa: B023
                values.setdefault("privfl", []).append(value)
                result.time("privfl", seconds)
                line = (f"  {case.model_label} | {case.name} | crop set {crop_set}"
                        f"{f', seed {seed}' if len(seeds) > 1 else ''}: privfl {value:.2f} dB ({seconds:.1f} s)")
                if case.local_steps is None or case.labels_known:
                    for key, runner in runners.items():
                        value, seconds = timed_psnr(lambda: runner.reconstruct(model, obs, seed=seed), x)  # noqa: B023
                        values.setdefault(key, []).append(value)
                        result.time(key, seconds)
                        line += f", {key} {value:.2f} dB ({seconds:.1f} s)"
                print(line, flush=True)
            for key, per_seed in values.items():
                result.add(key, per_seed)
        results.append(result)
    return results


def _span(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f} to {max(values):.1f})"


def print_tables(results: list[CaseResult]) -> None:
    """Summary per case, per-crop differences and the verdict against the issue's criterion."""
    print("| model | server sees | crop sets | privfl attack | privfl dB median (min to max) | breaching dB median "
          "(min to max) | privfl - breaching, median of crop sets | worst crop set | breaching, TV 0 | s/attack "
          "privfl / breaching |")
    print("|" + "---|" * 10)
    pairs: list[tuple[float, float, str]] = []
    for r in results:
        c = r.case
        name = "inverting-gradients" if c.local_steps is None else "fedavg-inversion"
        t_privfl = statistics.fmean(r.seconds["privfl"])
        if r.breaching:
            diffs = [p - b for p, b in zip(r.privfl, r.breaching, strict=True)]
            pairs += [(p, b, f"{c.model_label}, {c.name}, crop set {i}")
                      for i, (p, b) in enumerate(zip(r.privfl, r.breaching, strict=True))]
            cells = (f"{_span(r.breaching)} | {statistics.median(diffs):+.1f} | {min(diffs):+.1f} | "
                     f"{_span(r.breaching_tv0) if r.breaching_tv0 else '—'} | {t_privfl:.1f} / {statistics.fmean(r.seconds['breaching']):.1f}")
        else:
            expressible = c.local_steps is None or c.labels_known
            why = "breaching not run" if expressible else "not expressible in breaching"
            cells = f"{why} | — | — | — | {t_privfl:.1f} / —"
        print(f"| {c.model_label} | {c.name} | {len(r.privfl)} | {name} | {_span(r.privfl)} | {cells} |")
    if not pairs:
        return
    compared = [r for r in results if r.breaching]
    sets = len(compared[0].privfl)
    print()
    print("| model | server sees | " + " | ".join(f"crop set {i}" for i in range(sets)) + " |")
    print("|" + "---|" * (sets + 2))
    for r in compared:
        cells = " | ".join(f"{p:.1f} / {b:.1f}" for p, b in zip(r.privfl, r.breaching, strict=True))
        print(f"| {r.case.model_label} | {r.case.name} | {cells} |")
    worst = min(pairs, key=lambda t: t[0] - t[1])
    within = all(p >= b - 1.0 for p, b, _ in pairs)
    med_p, med_b = statistics.median(p for p, _, _ in pairs), statistics.median(b for _, b, _ in pairs)
    seeds = len(compared[0].runs["privfl"][0])
    runs = "compared runs" if seeds == 1 else f"compared crop sets (each the mean of {seeds} seeds)"
    print()
    if seeds > 1:
        # How far one seed's figure can be from another's on the same crop set: the noise a single-seed
        # run-by-run comparison carries.
        for key in ("privfl", "breaching"):
            spread = [d for r in compared for d in r.seed_spread(key)]
            print(f"{key}: spread over the seeds on one crop set (max - min), median {statistics.median(spread):.1f} dB, "
                  f"largest {max(spread):.1f} dB")
    case_diffs = [(statistics.median(p - b for p, b in zip(r.privfl, r.breaching, strict=True)), r) for r in compared]
    worst_case = min(case_diffs, key=lambda t: t[0])
    print(f"cases: {len(compared)}; privfl within 1 dB of breaching or better on every case (median over its crop "
          f"sets): {'yes' if worst_case[0] >= -1.0 else 'no'} (worst: {worst_case[0]:+.1f} dB, "
          f"{worst_case[1].case.model_label}, {worst_case[1].case.name})")
    print(f"{runs}: {len(pairs)}; privfl within 1 dB of breaching or better on every one: "
          f"{'yes' if within else 'no'} (worst: {worst[0] - worst[1]:+.1f} dB, {worst[2]})")
    print(f"median PSNR over the {runs}: privfl {med_p:.1f} dB, breaching {med_b:.1f} dB "
          f"(difference {med_p - med_b:+.1f} dB; the criterion asks >= +3 dB: {'met' if med_p >= med_b + 3 else 'not met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500, help="optimizer steps per attack, for both")
    parser.add_argument("--crop-sets", type=int, default=8, help="crop sets per case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--scenarios", choices=sorted(SCENARIO_SETS), default="base",
                        help="base: 16x16, untrained ReLU and sigmoid (the documented table); 32: 32x32 crops; "
                             "trained: 16x16 through a briefly trained ReLU ConvNet")
    parser.add_argument("--no-tv0", dest="tv0", action="store_false",
                        help="skip the sensitivity runs of breaching with TV 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of both attacks' random starts (default 0, the documented tables); with more "
                             "than one, each crop set's figure is the mean over them and the seed spread is printed")
    parser.add_argument("--privfl-restarts", type=int, default=1, metavar="N",
                        help="restarts of privfl's attack (default 1, breaching's; more is not an equal budget)")
    parser.add_argument("--case", default="",
                        help="run only the cases whose model label or name contains this text (e.g. FedAvg)")
    args = parser.parse_args()
    cases = tuple(c for c in SCENARIO_SETS[args.scenarios] if args.case in f"{c.model_label} | {c.name}")
    if not cases:
        parser.error(f"--case {args.case!r} matches no case of --scenarios {args.scenarios}")
    torch.set_num_threads(args.threads)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed")
    if args.privfl_restarts < 1:
        parser.error("--privfl-restarts must be >= 1")
    budget = ("" if args.privfl_restarts == 1 else
              f"; privfl {args.privfl_restarts} restarts against breaching's 1: NOT an equal budget")
    print(f"seeds {args.seeds}, {args.threads} torch thread(s), {args.iterations} iterations, {len(cases)} case(s){budget}",
          flush=True)
    print_tables(compare(iterations=args.iterations, crop_sets=args.crop_sets, cases=cases, tv0=args.tv0,
                         seeds=tuple(args.seeds), restarts=args.privfl_restarts))


if __name__ == "__main__":
    main()
