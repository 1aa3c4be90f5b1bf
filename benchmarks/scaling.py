"""Cost of one federation round against a bare Opacus loop, from 10 to 10,000 clients.

Usage: ``python benchmarks/scaling.py [--clients 10 100 1000] [--repeats 3] [--threads 1]``
(``--clients 10000`` is allowed; it takes a while).

Every client holds a small synthetic tabular dataset (30 features, 2 classes, seeded numpy RNG).
Two size kinds: ``homogeneous`` (every client 20 examples) and ``heterogeneous`` (sizes from a
seeded lognormal, clipped to 5..200, so there are many distinct sizes, the case where the
accountant cannot share work between clients). The variants, each over the same clients:

- ``bare``: a minimal DP-SGD round without privfl: for each client a fresh
  ``LogisticRegression(30, 2)`` holding the global parameters, ``PrivacyEngine().make_private``
  (Opacus' own Poisson loader, per-sample hooks, the same batch size, noise multiplier and
  clipping norm), one local epoch, then the example-weighted mean of the updates.
- ``privfl``: ``Federation.run()`` with plaintext protection (so protection cost does not
  dominate) and no run directory.
- ``privfl-dir``: the same with a run directory (``Federation.run(out_dir)``: fsynced ledger
  journal, history, checkpoints), in a fresh temporary directory.
- ``sites``: the deployment's roles in one process: one ``privfl.site.Site`` per client, each with
  its own state directory (its own fsynced ledger, ``run.json``), and one ``Aggregator`` reaching
  them over ``LocalSites`` (every request and reply as bytes), no run directory.
- ``sites-copy``: ``sites`` with a new copy of the model for every request (``ModelPool`` keeps
  none), to measure what resetting the model in place saves.

What "a round" is: every variant runs two rounds and only the second is timed (the first warms up
imports, allocator and caches). For privfl the clock is read each time the driver finishes a round
(after its history and checkpoint are written), by wrapping the driver's progress hook in the
child process, so round 2 = everything the driver does between the end of round 1 and the end of
round 2, persistence included (the Aggregator reports rounds through the same hook); the once-per-run set-up (noise plan, ledger registration, run
directory creation) is reported separately as "setup", and the final summary is not counted.
CPU is ``time.process_time`` (this process, all threads), wall is ``time.perf_counter``.

Each variant run is a fresh child process (``--one VARIANT``) so that its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``, imports included) belongs to that variant alone; the child
prints one JSON line. Variants are interleaved (their order rotates every repeat) so a burst of
load from elsewhere hits them alike; per (clients, sizes) the table gives the median CPU seconds of
the timed round and the median and min of the per-repeat ratios privfl / bare.

Noise: a fixed noise multiplier (``--sigma``, default 1.0) with no epsilon budget, so privfl's
ledger still evaluates every client's epsilon every round but no run-time calibration happens;
``--target-epsilon`` calibrates per client instead (set-up cost; the bare loop then uses the same
per-client sigmas, computed before its clock starts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

VARIANTS = ("bare", "privfl", "privfl-dir", "sites", "sites-copy")
SIZE_KINDS = ("homogeneous", "heterogeneous")
FEATURES = 30


def client_sizes(num_clients: int, kind: str, seed: int) -> list[int]:
    import numpy as np

    if kind == "homogeneous":
        return [20] * num_clients
    rng = np.random.default_rng(seed)
    return [int(s) for s in np.clip(np.rint(rng.lognormal(mean=3.5, sigma=0.9, size=num_clients)), 5, 200)]


def client_data(sizes: list[int], seed: int):
    """Per client (features float32 (n, 30), labels int64 (n,)), from one seeded RNG."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    w = rng.normal(size=FEATURES)
    data = []
    for n in sizes:
        x = rng.normal(size=(n, FEATURES)).astype(np.float32)
        y = ((x @ w + rng.normal(scale=0.5, size=n)) > 0).astype(np.int64)
        data.append((x, y))
    return data


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _configs(args):
    from privfl.config import ClippingMode, DPConfig, FederationConfig, ProtectionKind, TrainingConfig

    clipping = ClippingMode(args.clipping)
    if args.target_epsilon is not None:
        dp = DPConfig(target_epsilon=args.target_epsilon, max_grad_norm=1.0, clipping=clipping)
    else:
        dp = DPConfig(noise_multiplier=args.sigma, max_grad_norm=1.0, clipping=clipping)
    training = TrainingConfig(local_epochs=1, batch_size=args.batch_size, learning_rate=0.1, dp=dp)
    federation = FederationConfig(rounds=2, protection=ProtectionKind.PLAINTEXT, seed=0, noise_seed=0, device="cpu")
    return training, federation


def _run_toml(args) -> str:
    """The run config of ``_configs`` as TOML, for the Aggregator and the Sites."""
    noise = f"target_epsilon = {args.target_epsilon}" if args.target_epsilon is not None else f"noise_multiplier = {args.sigma}"
    return (
        "[model]\nkind = \"logistic\"\n"
        f"[training]\nlocal_epochs = 1\nbatch_size = {args.batch_size}\nlearning_rate = 0.1\n"
        f"[training.dp]\n{noise}\nmax_grad_norm = 1.0\nclipping = \"{args.clipping}\"\n"
        "[federation]\nrounds = 2\nprotection = \"plaintext\"\nseed = 0\nnoise_seed = 0\ndevice = \"cpu\"\n"
    )


def _round_stamps():
    """Wraps the drivers' progress hook: a (CPU, wall) stamp when rounds start and after each round."""
    import privfl.federation as fed_module

    stamps: list[tuple[float, float]] = []
    progress_cls = fed_module._Progress
    original_enter, original_advance = progress_cls.__enter__, progress_cls.advance

    def enter(self):
        stamps.append((time.process_time(), time.perf_counter()))  # set-up done, rounds start
        return original_enter(self)

    def advance(self, record):
        stamps.append((time.process_time(), time.perf_counter()))  # round done, history + checkpoint written
        return original_advance(self, record)

    progress_cls.__enter__, progress_cls.advance = enter, advance

    def restore() -> None:
        progress_cls.__enter__, progress_cls.advance = original_enter, original_advance

    return stamps, restore


def _timings(stamps, c0: float, w0: float) -> dict:
    assert len(stamps) == 3
    return {
        "setup_cpu": stamps[0][0] - c0, "setup_wall": stamps[0][1] - w0,
        "round_cpu": stamps[2][0] - stamps[1][0], "round_wall": stamps[2][1] - stamps[1][1],
    }


def run_sites(args, data, *, keep_models: bool = True) -> dict:
    from privfl.aggregator import Aggregator, LocalSites
    from privfl.data import ArrayDataset
    from privfl.model_pool import ModelPool
    from privfl.models import LogisticRegression
    from privfl.site import Site

    if not keep_models:
        ModelPool.give_back = lambda self, model: None  # type: ignore[method-assign]  # every take builds a new copy

    root = tempfile.mkdtemp(prefix="privfl-scaling-sites-", dir=args.tmp_dir)
    stamps, restore = _round_stamps()
    try:
        model_fn = lambda: LogisticRegression(FEATURES, 2)
        # allow_noise_seed: the same seeded noise as the other variants. budget=inf: the config sets no
        # epsilon budget (a fixed sigma, no calibration), which a Site refuses unless told it is uncapped.
        sites = [Site(f"site-{k:05d}", ArrayDataset(x, y), os.path.join(root, f"site-{k:05d}"), model_fn=model_fn, device="cpu",
                      allow_noise_seed=True, budget=float("inf"))
                 for k, (x, y) in enumerate(data)]
        aggregator = Aggregator(_run_toml(args), model_fn=model_fn, progress=False)
        c0, w0 = time.process_time(), time.perf_counter()
        result = aggregator.run(LocalSites(sites))
    finally:
        restore()
        shutil.rmtree(root, ignore_errors=True)
    assert len(result.history[-1]["trained"]) == len(data)
    return _timings(stamps, c0, w0)


def run_privfl(args, data, with_dir: bool) -> dict:
    from privfl.data import ArrayDataset
    from privfl.federation import Federation
    from privfl.models import LogisticRegression

    training, federation = _configs(args)
    clients = {f"site-{k:05d}": ArrayDataset(x, y) for k, (x, y) in enumerate(data)}
    stamps, restore = _round_stamps()
    out = tempfile.mkdtemp(prefix="privfl-scaling-", dir=args.tmp_dir) if with_dir else None
    try:
        fed = Federation(
            model_fn=lambda: LogisticRegression(FEATURES, 2), clients=clients, training=training,
            federation=federation, progress=False,
        )
        c0, w0 = time.process_time(), time.perf_counter()
        result = fed.run(os.path.join(out, "run") if out else None)
    finally:
        restore()
        if out:
            shutil.rmtree(out, ignore_errors=True)
    assert len(result.history[-1]["trained"]) == len(data)
    return _timings(stamps, c0, w0)


def run_bare(args, data) -> dict:
    import numpy as np
    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from privfl.models import LogisticRegression

    if args.target_epsilon is not None:
        from privfl.plan import plan_site

        training, federation = _configs(args)
        sigmas = [plan_site(len(y), training, federation, len(data)).noise_multiplier for _, y in data]
    else:
        sigmas = [args.sigma] * len(data)
    datasets = [TensorDataset(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    torch.manual_seed(0)
    global_model = LogisticRegression(FEATURES, 2)
    global_flat = torch.cat([p.detach().reshape(-1) for p in global_model.parameters()]).numpy().copy()

    def one_round() -> np.ndarray:
        total = np.zeros_like(global_flat)
        weight = 0
        for dataset, sigma in zip(datasets, sigmas, strict=True):
            model = LogisticRegression(FEATURES, 2)
            torch.nn.utils.vector_to_parameters(torch.from_numpy(global_flat), model.parameters())
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            loader = DataLoader(dataset, batch_size=args.batch_size)
            criterion = nn.CrossEntropyLoss()
            private_model, private_optimizer, private_loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=1.0, grad_sample_mode="hooks",
            )
            for inputs, labels in private_loader:
                private_optimizer.zero_grad(set_to_none=True)
                loss = criterion(private_model(inputs), labels)
                loss.backward()
                private_optimizer.step()
            private_model.remove_hooks()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
            total += len(dataset) * (flat - global_flat)
            weight += len(dataset)
        return (global_flat + total / weight).astype(np.float32)

    global_flat = one_round()  # warm-up round, not timed
    c0, w0 = time.process_time(), time.perf_counter()
    global_flat = one_round()
    return {"setup_cpu": 0.0, "setup_wall": 0.0, "round_cpu": time.process_time() - c0, "round_wall": time.perf_counter() - w0}


def child(args) -> None:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    sizes = client_sizes(args.num_clients, args.sizes, args.seed)
    data = client_data(sizes, args.seed)
    if args.one == "bare":
        result = run_bare(args, data)
    elif args.one in ("sites", "sites-copy"):
        result = run_sites(args, data, keep_models=args.one == "sites")
    else:
        result = run_privfl(args, data, with_dir=args.one == "privfl-dir")
    result.update(variant=args.one, clients=args.num_clients, sizes=args.sizes, distinct=len(set(sizes)),
                  examples=sum(sizes), threads=torch.get_num_threads(), peak_rss_mib=_peak_rss_mib())
    print(json.dumps(result))


def spawn(args, variant: str, num_clients: int, kind: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--num-clients", str(num_clients),
           "--sizes", kind, "--threads", str(args.threads), "--seed", str(args.seed), "--sigma", str(args.sigma),
           "--batch-size", str(args.batch_size), "--clipping", args.clipping]
    if args.target_epsilon is not None:
        cmd += ["--target-epsilon", str(args.target_epsilon)]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    return run_child(cmd, args.threads)


def run_child(cmd: list[str], threads: int) -> dict:
    """Runs one benchmark child process with ``threads`` OpenMP/MKL/OpenBLAS threads and the repository
    on its path; returns its last stdout line, parsed as JSON."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({shlex.join(cmd)}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--size-kinds", nargs="+", choices=SIZE_KINDS, default=list(SIZE_KINDS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:3]),
                        help="what to time besides bare (default: bare privfl privfl-dir; add sites for the roles)")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads in every child (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sigma", type=float, default=1.0, help="fixed noise multiplier (default 1.0)")
    parser.add_argument("--target-epsilon", type=float, help="calibrate sigma per client instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clipping", default="auto", choices=["auto", "per_sample", "ghost", "bookkeeping"],
                        help="privfl's clipping mode (default auto, what a run uses; bare Opacus always uses its hooks)")
    parser.add_argument("--tmp-dir", help="where privfl-dir makes its run directories (default: the system's)")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--num-clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", choices=SIZE_KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args)
        return

    print("command: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print(f"threads per child: torch {args.threads}, OMP/MKL/OpenBLAS {args.threads}; "
          f"{os.cpu_count()} CPUs; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    noise = f"target epsilon {args.target_epsilon} (calibrated)" if args.target_epsilon is not None else f"sigma {args.sigma}"
    print(f"batch {args.batch_size}, {noise}, 1 local epoch, plaintext protection, privfl clipping {args.clipping}; "
          f"round 2 of 2 timed; {args.repeats} repeats")
    rows = []
    for num_clients in args.clients:
        for kind in args.size_kinds:
            variants = tuple(v for v in VARIANTS if v in args.variants or v == "bare")
            samples: dict[str, list[dict]] = {v: [] for v in variants}
            for repeat in range(args.repeats):
                order = variants[repeat % len(variants):] + variants[:repeat % len(variants)]
                for variant in order:
                    result = spawn(args, variant, num_clients, kind)
                    samples[variant].append(result)
                    print(f"  {num_clients} {kind} #{repeat} {variant}: round cpu {result['round_cpu']:.3f} s, "
                          f"wall {result['round_wall']:.3f} s, setup cpu {result['setup_cpu']:.3f} s, "
                          f"peak RSS {result['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
            rows.append((num_clients, kind, samples))

    def med(values):
        return statistics.median(values)

    def ratios(variant, bare, key):
        """Per-repeat ratios variant / bare of ``key`` (the repeats took turns)."""
        return [v[key] / b[key] for v, b in zip(variant, bare, strict=True)]

    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if {"privfl", "privfl-dir"} <= set(args.variants):
        header = ("| clients | sizes | distinct | bare CPU s | privfl CPU s | privfl+dir CPU s | privfl/bare med (min) "
                  "| privfl+dir/bare med (min) | +dir/bare wall med | setup CPU s (privfl, +dir) | peak RSS MiB (bare, privfl, +dir) |")
        print(header)
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for num_clients, kind, samples in rows:
            bare, plain, with_dir = samples["bare"], samples["privfl"], samples["privfl-dir"]
            r_plain, r_dir = ratios(plain, bare, "round_cpu"), ratios(with_dir, bare, "round_cpu")
            r_wall = ratios(with_dir, bare, "round_wall")
            print(
                f"| {num_clients:,} | {kind} | {bare[0]['distinct']} | {med([b['round_cpu'] for b in bare]):.3f} "
                f"| {med([p['round_cpu'] for p in plain]):.3f} | {med([d['round_cpu'] for d in with_dir]):.3f} "
                f"| {med(r_plain):.2f} ({min(r_plain):.2f}) | {med(r_dir):.2f} ({min(r_dir):.2f}) | {med(r_wall):.2f} "
                f"| {med([p['setup_cpu'] for p in plain]):.2f}, {med([d['setup_cpu'] for d in with_dir]):.2f} "
                f"| {med([b['peak_rss_mib'] for b in bare]):.0f}, {med([p['peak_rss_mib'] for p in plain]):.0f}, "
                f"{med([d['peak_rss_mib'] for d in with_dir]):.0f} |"
            )
    if "sites" in args.variants:
        print("\nSites and the Aggregator over LocalSites (one state directory per site), against bare:")
        print("| clients | sizes | bare CPU s | sites CPU s | sites/bare CPU med (min) | sites/bare wall med (min) "
              "| setup CPU s | peak RSS MiB (bare, sites) |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for num_clients, kind, samples in rows:
            bare, sites = samples["bare"], samples["sites"]
            r_cpu, r_wall = ratios(sites, bare, "round_cpu"), ratios(sites, bare, "round_wall")
            print(
                f"| {num_clients:,} | {kind} | {med([b['round_cpu'] for b in bare]):.3f} | {med([t['round_cpu'] for t in sites]):.3f} "
                f"| {med(r_cpu):.2f} ({min(r_cpu):.2f}) | {med(r_wall):.2f} ({min(r_wall):.2f}) "
                f"| {med([t['setup_cpu'] for t in sites]):.2f} "
                f"| {med([b['peak_rss_mib'] for b in bare]):.0f}, {med([t['peak_rss_mib'] for t in sites]):.0f} |"
            )
    if {"sites", "sites-copy"} <= set(args.variants):
        print("\nA new model copy per request (sites-copy) against the model reset in place (sites):")
        print("| clients | sizes | sites CPU s | sites-copy CPU s | sites-copy/sites CPU per repeat | med (min) |")
        print("|---:|---|---:|---:|---|---:|")
        for num_clients, kind, samples in rows:
            sites, copies = samples["sites"], samples["sites-copy"]
            r_cpu = ratios(copies, sites, "round_cpu")
            print(
                f"| {num_clients:,} | {kind} | {med([t['round_cpu'] for t in sites]):.3f} | {med([t['round_cpu'] for t in copies]):.3f} "
                f"| {', '.join(f'{r:.2f}' for r in r_cpu)} | {med(r_cpu):.2f} ({min(r_cpu):.2f}) |"
            )

if __name__ == "__main__":
    main()
