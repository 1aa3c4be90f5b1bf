"""A larger fuzzing campaign over the decoders of tests/test_fuzz_decoders.py: prints one row per decoder.

Usage:
    python benchmarks/fuzz_decoders.py [--inputs 20000] [--seed 0] [--only NAME] [--timeout 10]

Every input is fed to one decoder and classified: accepted, rejected with a typed PrivflError, or an
untyped error (any other exception, or an input that ran longer than ``--timeout`` seconds: a hang).
The first input of each untyped error type is printed in full so it can be turned into a test.
The targets, seeds and mutators are the test module's own (one truth for both).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _load_harness():
    spec = importlib.util.spec_from_file_location("fuzz_harness", ROOT / "tests" / "test_fuzz_decoders.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_harness"] = module
    spec.loader.exec_module(module)
    return module


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def campaigns(h) -> dict[str, tuple[Callable[[random.Random], Any], Callable[[Any], object]]]:
    """Decoder name -> (input generator, decoder call)."""
    from privfl.attacks.matrix import attack_config_from_dict, load_attack_config
    from privfl.config import config_from_dict, dataclass_from_dict, load_config, load_toml

    out: dict[str, tuple[Callable[[random.Random], Any], Callable[[Any], object]]] = {}
    for name, target in h.TARGETS.items():
        out[name] = (lambda rnd, t=target: h.random_bytes_input(t, rnd), target.deliver)
    for side in ("server", "client"):
        out[f"secagg {side} state machine"] = (h.random_secagg_input, lambda item, s=side: h.secagg_deliver(item, side=s))
    out["load_config (TOML file)"] = (lambda rnd: h.random_config_text(0, rnd), lambda text: h._load_text(load_config, text))
    out["load_attack_config (TOML file)"] = (lambda rnd: h.random_config_text(1, rnd), lambda text: h._load_text(load_attack_config, text))
    out["load_config (file bytes)"] = (lambda rnd: h.random_config_bytes(0, rnd), lambda data: h._load_bytes(load_config, data))
    out["load_attack_config (file bytes)"] = (lambda rnd: h.random_config_bytes(1, rnd), lambda data: h._load_bytes(load_attack_config, data))
    out["load_toml (random text)"] = (
        lambda rnd: "".join(chr(rnd.choice((rnd.randrange(32, 127), rnd.randrange(0x110000)))) for _ in range(rnd.randrange(200))),
        lambda text: h._load_text(load_toml, "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)),
    )
    out["config_from_dict (typed tables)"] = (lambda rnd: h.random_table(0, rnd), config_from_dict)
    out["attack_config_from_dict (typed tables)"] = (lambda rnd: h.random_table(1, rnd), attack_config_from_dict)

    def dataclass_input(rnd: random.Random):
        cls = rnd.choice(h.CONFIG_CLASSES)
        return cls, h.mutate_table({"federation": None}, rnd) if rnd.random() < 0.1 else h.mutate_table(_table_for(h, cls), rnd)

    out["dataclass_from_dict (all config classes)"] = (
        dataclass_input,
        lambda item: dataclass_from_dict(item[0], item[1] if isinstance(item[1], dict) else {"x": item[1]}, "fuzz"),
    )
    return out


def _table_for(h, cls) -> dict[str, Any]:
    import tomllib

    base = tomllib.loads(h._default_texts()[0])
    return {
        h.RunConfig: base,
        h.FederationConfig: base["federation"],
        h.TrainingConfig: base["training"],
        h.DPConfig: base["training"]["dp"],
        h.ClientDPConfig: {"target_epsilon": 2.0, "clip_norm": 0.5},
        h.DataConfig: base["data"],
    }[cls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="run only decoders whose name contains this")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before an input counts as a hang")
    args = parser.parse_args()

    from privfl.errors import PrivflError

    h = _load_harness()
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for name, (generate, decode) in campaigns(h).items():
        if args.only and args.only not in name:
            continue
        rnd = random.Random(f"{args.seed}:{name}")
        counts: Counter[str] = Counter()
        untyped: Counter[str] = Counter()
        examples: dict[str, tuple[Any, str]] = {}
        slowest = 0.0
        started = time.perf_counter()
        for _ in range(args.inputs):
            item = generate(rnd)
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
            try:
                decode(item)
                counts["accepted"] += 1
            except PrivflError:
                counts["typed"] += 1
            except _Hang:
                untyped["hang"] += 1
                examples.setdefault("hang", (item, "no answer within the timeout"))
            except Exception as exc:  # the point is to catch what should not escape
                key = type(exc).__name__
                untyped[key] += 1
                examples.setdefault(key, (item, traceback.format_exc(limit=-3)))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - t0)
        seconds = time.perf_counter() - started
        rows.append((name, args.inputs, counts["accepted"], counts["typed"], sum(untyped.values()), dict(untyped), slowest, seconds))
        print(f"{name}: {counts['accepted']} accepted, {counts['typed']} typed, {sum(untyped.values())} untyped {dict(untyped)} "
              f"({seconds:.1f} s, slowest input {slowest * 1e3:.1f} ms)", file=sys.stderr, flush=True)
        for key, (item, trace) in examples.items():
            print(f"  first {key} on {name}: input={item!r:.600}\n{trace}", file=sys.stderr, flush=True)

    print()
    print(f"| decoder | inputs | accepted | typed rejects | untyped errors | slowest input (ms) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, accepted, typed, bad, kinds, slowest, seconds in rows:
        detail = f"{bad} ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if bad else "0"
        print(f"| {name} | {n} | {accepted} | {typed} | {detail} | {slowest * 1e3:.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
