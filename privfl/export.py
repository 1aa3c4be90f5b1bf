"""A model to take home: load a run's parameters into the user's model, or export them as a state_dict.

A checkpoint holds the global parameters as one flat float32 vector (``{'round', 'parameters'}``,
see :mod:`privfl.rundir`). A vector of the right length loads into any model of that size, so a
model whose BatchNorm the run replaced by GroupNorm (:func:`~privfl.training.convert_for_dp`)
"works" in the original architecture and computes the wrong function. So:

- every run with a directory records the architecture that trained in ``model.json`` (each layer
  holding parameters or buffers, with their names and shapes);
- :func:`load_model` builds ``model_fn()``, applies the same DP-SGD conversions, checks the
  result against ``model.json`` and only then loads the parameters;
- :func:`export_model` writes ``{"state_dict", "dp_changes", "round", "run", ...}`` with
  ``torch.save``; everything in it is a tensor, a string or a number, so it loads with
  ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privfl.errors import ConfigError
from privfl.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    HISTORY_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    durable_write_bytes,
    durable_write_json,
    load_checkpoint,
    load_history,
    load_run_identity,
)

__all__ = [
    "EXPORT_FORMAT",
    "MODEL_FILE",
    "ExportResult",
    "architecture_of",
    "check_recorded_architecture",
    "export_model",
    "export_run",
    "load_model",
    "record_architecture",
]

MODEL_FILE = "model.json"
EXPORT_FORMAT = "privfl-model/1"
_ARCHITECTURE_FORMAT = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        path: the file written.
        round: the round whose parameters it holds (0-based).
        num_parameters: trainable parameters in the model.
        dp_changes: the layers converted for DP-SGD, as ``"path Before -> After"``.
        checked_architecture: whether ``model.json`` was there to check the model against (runs
            made before it was recorded are checked on the parameter count only).
    """

    path: Path
    round: int
    num_parameters: int
    dp_changes: tuple[str, ...]
    checked_architecture: bool


# -- the architecture record ----------------------------------------------------------------------------
def architecture_of(model: nn.Module) -> list[dict[str, Any]]:
    """Every layer of ``model`` that holds parameters or buffers, in module order.

    Each entry: ``{"module": path, "layer": "GroupNorm(1, 16, eps=1e-05, affine=True)",
    "parameters": [[name, shape], ...], "buffers": [[name, shape], ...]}``. Two models with the
    same entries compute the same function of the same state_dict; the parameter count alone
    does not say that.
    """
    layers = []
    for path, module in model.named_modules():
        params = [[name, list(p.shape)] for name, p in module.named_parameters(recurse=False)]
        buffers = [[name, list(b.shape)] for name, b in module.named_buffers(recurse=False)]
        if params or buffers:
            layers.append(
                {"module": path, "layer": f"{type(module).__name__}({module.extra_repr()})", "parameters": params, "buffers": buffers}
            )
    return layers


def record_architecture(run_dir: str | os.PathLike[str], model: nn.Module) -> None:
    """Writes ``model.json`` (the architecture that trains) into a run directory, once.

    Called by the federation with the DP-compatible model; an existing record (a resumed run)
    is left as it is.
    """
    path = Path(run_dir) / MODEL_FILE
    if path.exists():
        return
    record = {"format": _ARCHITECTURE_FORMAT, "model": _qualname(model), "layers": architecture_of(model)}
    durable_write_json(path, record)


def check_recorded_architecture(run_dir: str | os.PathLike[str], model: nn.Module) -> None:
    """Checks a model (already made DP-compatible) against the run's ``model.json``, if it has one.

    A resumed run calls this before it touches anything: the rounds it adds must train the
    architecture the earlier ones did, or the final model would load with neither ``model_fn``.

    Raises:
        ConfigError: ``model.json`` is unreadable, or names another layer than the model has.
    """
    run = Path(run_dir)
    recorded = _read_architecture(run)
    if recorded is None:
        return
    try:
        _check_architecture(recorded, architecture_of(model), type(model).__name__, run)
    except ConfigError as exc:
        raise ConfigError(
            exc.field, exc.value, f"{exc.reason}. If the run there never trained (`privfl audit` shows what its ledger holds), "
            "start the corrected model in a new directory"
        ) from None


def _read_architecture(run_dir: Path) -> list[dict[str, Any]] | None:
    path = run_dir / MODEL_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(MODEL_FILE, str(path), f"cannot be read ({type(exc).__name__}): the file is corrupt") from None
    if not (isinstance(record, dict) and record.get("format") == _ARCHITECTURE_FORMAT and isinstance(record.get("layers"), list)):
        raise ConfigError(MODEL_FILE, str(path), "is not an architecture record this privfl can read")
    return record["layers"]


def _check_architecture(recorded: list[dict[str, Any]], built: list[dict[str, Any]], model_name: str, run_dir: Path) -> None:
    """Raises a ConfigError naming the first layer where the built model differs from the run's."""
    for index in range(max(len(recorded), len(built))):
        ran = recorded[index] if index < len(recorded) else None
        got = built[index] if index < len(built) else None
        if ran == got:
            continue
        ran_text = f"{ran['module']}: {ran['layer']}" if ran else "nothing"
        got_text = f"{got['module']}: {got['layer']}" if got else "nothing"
        raise ConfigError(
            "model_fn",
            model_name,
            f"does not build the architecture the run in {run_dir} trained (after the same DP-SGD conversions): "
            f"layer {index} is {got_text}, the run trained {ran_text}. Pass the model_fn the run was made with",
        )


# -- loading ---------------------------------------------------------------------------------------
def _checkpoint_rounds(run_dir: Path) -> list[int]:
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    pattern = re.compile(r"round-(\d{4,})\.pt")
    return sorted(int(m.group(1)) for m in (pattern.fullmatch(p.name) for p in folder.iterdir()) if m)


def _resolve_round(run_dir: Path, round_index: int | None) -> int:
    if not run_dir.is_dir():
        raise ConfigError("run_dir", str(run_dir), "is not a directory")
    rounds = _checkpoint_rounds(run_dir)
    if not rounds:
        raise ConfigError("run_dir", str(run_dir), f"holds no checkpoint ({CHECKPOINT_DIR}/round-NNNN.pt): no round finished there")
    if round_index is None:
        return rounds[-1]
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index not in rounds:
        raise ConfigError("round", round_index, f"no checkpoint for it in {run_dir}; rounds {rounds[0]}..{rounds[-1]} have one")
    return round_index


def initial_run_model(model_fn: Callable[[], nn.Module], identity: dict[str, Any]) -> tuple[nn.Module, tuple[str, ...]]:
    """``model_fn()`` initialised as the run's initial model was, then converted for DP-SGD."""
    from privfl.training import convert_for_dp, warn_conversion

    if not callable(model_fn):
        raise ConfigError("model_fn", model_fn, "must be a callable returning a torch.nn.Module")
    seed = identity["federation"].get("seed", 0)
    # The run seeded torch with federation.seed before building its initial model: frozen
    # parameters and buffers, which no checkpoint holds, then come out the same. fork_rng keeps
    # the caller's own random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise ConfigError("model_fn", type(model).__name__, "must return a torch.nn.Module")
    conversion = convert_for_dp(model)
    # The same one-line warning as during the run: the model returned is not the one model_fn built.
    warn_conversion(type(model).__name__, conversion)
    return conversion.model, tuple(str(change) for change in conversion.changes)


def _load(
    run_dir: str | os.PathLike[str], model_fn: Callable[[], nn.Module], round_index: int | None
) -> tuple[nn.Module, int, tuple[str, ...], bool, dict[str, Any]]:
    from privfl.audit.deployment import server_run_dir
    from privfl.training import load_flat_parameters

    run = server_run_dir(run_dir)
    chosen = _resolve_round(run, round_index)
    identity = load_run_identity(run / RUN_FILE)
    model, changes = initial_run_model(model_fn, identity)
    name = type(model).__name__
    recorded = _read_architecture(run)
    if recorded is not None:
        _check_architecture(recorded, architecture_of(model), name, run)
    num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        flat = load_checkpoint(run, chosen, num_parameters)
    except ConfigError as exc:
        # Only a size mismatch is the model's fault (and, without model.json, the only check
        # there is); a corrupt or missing checkpoint stays the checkpoint's error.
        if "parameters; the model has" in exc.reason:
            raise ConfigError(
                "model_fn", name, f"has {num_parameters} trainable parameters; the run in {run} trained another model ({exc.reason})"
            ) from None
        raise
    load_flat_parameters(model, flat)
    model.eval()
    return model, chosen, changes, recorded is not None, identity


def load_model(run_dir: str | os.PathLike[str], model_fn: Callable[[], nn.Module], *, round: int | None = None) -> nn.Module:
    """The model a run trained, with its final (or a chosen round's) global parameters.

    Builds ``model_fn()`` the way the run built its initial model (torch seeded with
    ``federation.seed``), applies the same DP-SGD conversions (BatchNorm to GroupNorm, with the
    usual warning), checks the result against the architecture the run recorded in
    ``model.json``, and loads the checkpoint. The model is returned in eval mode.

    Args:
        run_dir: a run directory written by ``Federation.run`` or ``privfl run``, or a
            ``privfl deploy local`` directory (its server run directory, ``run/``, is read).
        model_fn: the model factory the run was made with.
        round: the 0-based round whose parameters to load (default: the last checkpointed round,
            the final model of a finished run).

    Returns:
        The model, holding the run's parameters.

    Raises:
        ConfigError: no such run directory, round or checkpoint; a corrupt checkpoint, run.json or
            model.json; or ``model_fn`` builds another architecture than the run trained (the
            message names the first layer that differs).
    """
    return _load(run_dir, model_fn, round)[0]


# -- exporting ------------------------------------------------------------------------------------
def export_model(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model_fn: Callable[[], nn.Module],
    *,
    round: int | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Writes a run's model as a state_dict with the architecture changes and the run's identity.

    The file (``torch.save``, loadable with ``torch.load(out, weights_only=True)``) holds:
    ``format`` (``"privfl-model/1"``), ``state_dict``, ``model`` (the class), ``dp_changes``
    (``"path Before -> After"`` per converted layer: load the state_dict into a model converted
    the same way, e.g. with :func:`load_model`), ``architecture`` (see :func:`architecture_of`),
    ``round``, ``rounds_finished``, ``test_accuracy`` of that round, ``run_identity`` (run.json:
    the training and federation settings and each site's data fingerprint) and ``ledger_head``
    (the ledger's last line hash in summary.json, when the run finished) and ``input_preprocessing``
    (JSON: how raw inputs become the model's, e.g. the bundled data's standardisation with the
    training part's mean and std; None when not given).

    Args:
        run_dir: the run directory (or a ``privfl deploy local`` directory: its ``run/``).
        out: the file to write; it must not exist yet.
        model_fn: the model factory the run was made with.
        round: the 0-based round to export (default: the last checkpointed one).
        preprocessing: how raw inputs were prepared for training (JSON-ready; ``privfl export``
            gives the bundled dataset's, ``privfl.data.DatasetSplit.preprocessing``).

    Returns:
        What was written.

    Raises:
        ConfigError: everything :func:`load_model` raises; ``out`` exists or cannot be written.
    """
    target = Path(out)
    if target.exists() or target.is_symlink():
        raise ConfigError("out", str(target), "already exists; remove it or choose another --out")
    from privfl.audit.deployment import server_run_dir

    model, chosen, changes, checked, identity = _load(run_dir, model_fn, round)
    run = server_run_dir(run_dir)
    history = load_history(run / HISTORY_FILE)
    record = history[chosen] if chosen < len(history) else None
    ledger_head = None
    summary_path = run / SUMMARY_FILE
    if summary_path.exists():
        try:
            ledger = json.loads(summary_path.read_text()).get("ledger")
            ledger_head = ledger.get("head") if isinstance(ledger, dict) else None
        except (OSError, ValueError, AttributeError):
            ledger_head = None  # informative only: the audit, not the export, checks the ledger
    payload = {
        "format": EXPORT_FORMAT,
        "state_dict": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
        "model": _qualname(model),
        "dp_changes": list(changes),
        "architecture": json.dumps(architecture_of(model)),
        "round": chosen,
        "rounds_finished": len(history),
        "test_accuracy": None if record is None else record.get("test_accuracy"),
        "run_identity": json.dumps(identity, sort_keys=True),
        "ledger_head": ledger_head,
        "input_preprocessing": None if preprocessing is None else json.dumps(preprocessing, sort_keys=True),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        durable_write_bytes(target, buffer.getvalue())
    except OSError as exc:
        raise ConfigError("out", str(target), f"cannot be written: {exc.strerror or exc}") from None
    num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ExportResult(path=target, round=chosen, num_parameters=num_parameters, dp_changes=changes, checked_architecture=checked)


def _run_config(run: Path, config_path: str | os.PathLike[str] | None):
    """The config a run was made with, and where it came from: ``config_path``, else the run's own
    ``config.toml``, else the embedded demo."""
    from privfl.config import default_config, load_config

    if config_path is None and (run / CONFIG_FILE).is_file():
        config_path = run / CONFIG_FILE  # the config the run was made with
    config = load_config(config_path) if config_path is not None else default_config()
    return config, (str(config_path) if config_path is not None else "the embedded default config")


def run_setup(
    run_dir: str | os.PathLike[str], config_path: str | os.PathLike[str] | None = None, *, option: str = "--config"
) -> tuple[Callable[[], nn.Module], dict[str, Any]]:
    """The model builder and the sites' training data of a run made by ``privfl run``.

    run.json records the training and federation settings and each site's data fingerprint, but
    not the ``[data]`` and ``[model]`` tables; so both are rebuilt from the TOML config the run was
    made with (default: the run's own ``config.toml``, which ``privfl run`` and ``privfl deploy
    local`` keep, else the embedded demo), after checking that the config's training and federation
    settings and site names are the run's.

    ``option`` is the command-line option the error message tells the user to pass the config with.

    Returns:
        ``(model_fn, clients)``: builds the bundled model; site name -> its training Dataset.

    Raises:
        ConfigError: ``run_dir`` is not a run directory, or the config is not the run's (names the
            sections that differ).
    """
    from privfl.audit.deployment import server_run_dir
    from privfl.federation import public_config
    from privfl.models import build_model
    from privfl.runner import load_dataset, split_clients

    run = server_run_dir(run_dir)
    if not run.is_dir():
        raise ConfigError("run_dir", str(run), "is not a directory")
    config, source = _run_config(run, config_path)
    identity = load_run_identity(run / RUN_FILE)
    federation = json.loads(json.dumps(public_config(config.federation)))
    federation.pop("rounds", None)
    ours = {"training": json.loads(json.dumps(public_config(config.training))), "federation": federation}
    differ = [key for key in ("training", "federation") if _differs(identity.get(key), ours[key])]
    split = load_dataset(config)
    clients = _deployed_sites(run, identity, split.train.input_shape) or split_clients(config, split)
    if sorted(clients) != sorted(identity["clients"]):
        differ.append("data (site names)")
    if differ:
        raise ConfigError(
            "config", source, f"is not the config the run in {run} was made with ({', '.join(differ)} differ); "
            f"pass that TOML file with {option}"
            + (" (a run made in Python with your own model_fn has none: use privfl.export_model(run_dir, out, model_fn))"
               if option == "--config" else "")
        )

    def model_fn() -> nn.Module:
        return build_model(config.model, split.train.input_shape, split.train.num_classes)

    return model_fn, clients


def _deployed_sites(run: Path, identity: dict[str, Any], input_shape: tuple[int, ...]) -> dict[str, Any] | None:
    """The sites' data of a ``privfl deploy local`` run (``DIR/run``): each site's ``DIR/sites/NAME/data.csv``.

    None when ``run`` is not such a run (the sites' data then comes from the config's partition).
    """
    from privfl.site import _shaped, load_site_dataset

    folders = {name: run.parent / "sites" / name / "data.csv" for name in identity.get("clients", {})}
    if not folders or not all(path.is_file() for path in folders.values()):
        return None
    return {name: _shaped(load_site_dataset(str(path)), list(input_shape)) for name, path in folders.items()}


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config_path: str | os.PathLike[str] | None = None,
    round: int | None = None,
) -> ExportResult:
    """``privfl export``: exports a run made by ``privfl run``, rebuilding its bundled model
    from the config it was made with (see :func:`run_setup`).

    Raises:
        ConfigError: the config is not the run's (names the sections that differ), or anything
            :func:`export_model` raises.
    """
    from privfl.audit.deployment import server_run_dir
    from privfl.runner import load_dataset

    model_fn, _ = run_setup(run_dir, config_path)
    config, _ = _run_config(server_run_dir(run_dir), config_path)
    try:
        return export_model(run_dir, out, model_fn, round=round, preprocessing=load_dataset(config).preprocessing)
    except ConfigError as exc:
        if exc.field != "model_fn":
            raise
        # The config's bundled model for its bundled dataset is not what trained: a run on the user's
        # own data or model (a Federation script, or sites serving their own files).
        raise ConfigError(
            exc.field, exc.value,
            f"{exc.reason}. `privfl export` rebuilds the config's bundled model for its bundled dataset; a run on your own "
            "model or data is exported from Python with the model_fn it trained: "
            "privfl.export_model(RUN_DIR, OUT, model_fn)",
        ) from None


def _differs(recorded: Any, ours: Any) -> bool:
    """Whether a setting the run recorded differs from the config's.

    Only settings both know are compared: a field added to privfl since the run (recorded by
    neither the run nor its config file) must not make an old run unexportable.
    """
    if isinstance(recorded, dict) and isinstance(ours, dict):
        return any(_differs(recorded[key], ours[key]) for key in recorded.keys() & ours.keys())
    return recorded != ours


def _qualname(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"
