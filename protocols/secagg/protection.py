"""Secure aggregation as a federation :class:`~privfl.protocols.base.Protection`: weighted FedAvg over survivors.

Weights: client k sends Q(r_k * clip(delta_k)) and Q(r_k * c) as one extra coordinate, where
r_k = n_k / W in (0, 1] and W is the public ``weight_bound``. The server unmasks only the two sums,
sum_k r_k delta_k and c sum_k r_k, and the clients divide them: the average is
sum_k n_k delta_k / sum_k n_k up to quantization error; no single n_k is revealed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from privfl.errors import ConfigError, MessageError, ProtocolAbort
from privfl.protocols.base import SERVER, ClientUpdate, DistributedNoiseProtection, ReleaseNoise, RoundResult, Transport
from privfl.protocols.secagg.graph import check_neighbours
from privfl.protocols.secagg.keys import IdentityKey
from privfl.protocols.secagg.params import GraphChoice, check_threshold, min_threshold
from privfl.protocols.secagg.prg import WORD
from privfl.protocols.secagg.quantize import Quantizer
from privfl.protocols.secagg.server import SecAggServer
from privfl.protocols.secagg.simulate import RoundRun, drive, new_round, rounding_key
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = ["SecAggConfig", "SecAggProtection"]

_KIND_AGGREGATE = 8


@dataclass(frozen=True, kw_only=True, slots=True)
class SecAggConfig:
    """Settings of :class:`SecAggProtection`.

    Args:
        threshold: Shamir threshold t per neighbourhood: an int >= 2, or a fraction in (1/2, 1] of the share
            holders h (a client's neighbours plus itself), rounded up and at least 2. Every round needs
            t > h/2 (else a server that lies about who dropped can unmask a client): a fraction always
            resolves above half; an int below half of some round's holders is refused (ConfigError).
            Each neighbourhood then tolerates h - t dropouts; against an active server colluding with
            h_c of a client's holders, privacy needs 2t > h + h_c (docs/secagg.md).
        neighbours: the masking graph. ``"auto"`` (the default): the complete graph up to
            :data:`~privfl.protocols.secagg.params.COMPLETE_GRAPH_MAX_CLIENTS` clients per round, and
            above that the SecAgg+ graph of degree k = O(log n) and threshold t that
            :func:`~privfl.protocols.secagg.params.choose_graph` picks for ``dropout_rate`` and
            ``corruption_rate`` (Bell et al. 2020; failure probability at most 2^-40; ``threshold``
            then applies to complete-graph rounds only). An int k: SecAgg+ of that degree.
            ``"complete"`` or None: the complete graph (classic SecAgg) whatever the round size.
        dropout_rate: with ``neighbours="auto"``, the fraction of a round's clients that may drop out.
        corruption_rate: with ``neighbours="auto"``, the fraction that may collude with the server.
        clip_range: each coordinate of delta is clipped to [-clip_range, clip_range] (clipped counts are
            reported in the dropped/diagnostic data, never wrapped).
        bits: modulus 2^bits of the masked words (<= 32, so the upload is at most float32-sized).
        fraction_bits: fixed-point step 2^-fraction_bits; None picks the finest step that cannot overflow.
        weight_bound: public upper bound W on any n_k; None uses the largest weight of the round (which
            then becomes public).
        graph_seed: public seed of the SecAgg+ graph; None draws a fresh one per round.
        authenticated: run the variant that stands up to an active server (Bonawitz et al.): keys signed
            with long-term Ed25519 identities and a consistency check before unmasking.
        fail_on_clip: abort the round, before anything is masked, when any coordinate of any client
            would be clipped (set by client-level DP, whose noise shares must never be clipped:
            :func:`privfl.client_dp.secagg_range`). False: clip and count, as for plain FedAvg.
        fail_on_dropout: abort the round after unmasking, so that no client finalizes an average, when
            any client dropped out (set by client-level DP: with a dropout the sum's noise would reveal
            how many sites took part). False: the survivors' average, as usual.
        identities: authenticated mode: client id -> its long-term :class:`IdentityKey` (never shown in a
            repr). None generates one per client the first time it takes part and keeps it for later rounds.
    """

    threshold: int | float = 2 / 3
    neighbours: int | str | None = "auto"
    dropout_rate: float = 0.1
    corruption_rate: float = 0.0
    clip_range: float = 1.0
    bits: int = 32
    fraction_bits: int | None = None
    weight_bound: float | None = None
    graph_seed: bytes | None = None
    authenticated: bool = False
    fail_on_clip: bool = False
    fail_on_dropout: bool = False
    identities: Mapping[str, IdentityKey] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ConfigError("threshold", t, "must be an int >= 2 or a fraction in (1/2, 1]")
        if isinstance(t, int) and t < 2:
            raise ConfigError("threshold", t, "an integer threshold must be >= 2")
        if isinstance(t, float) and not 0.5 < t <= 1.0:
            raise ConfigError(
                "threshold",
                t,
                "a fractional threshold must be in (1/2, 1]: at or below half of the share holders, a server "
                "that lies about who dropped can collect both shares of one client",
            )
        k = self.neighbours
        if not (k is None or k in ("auto", "complete") or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)):
            raise ConfigError("neighbours", k, "must be \"auto\", \"complete\" (or None) or an int >= 1")
        if not (isinstance(self.dropout_rate, (int, float)) and 0 <= self.dropout_rate < 1):
            raise ConfigError("dropout_rate", self.dropout_rate, "must be in [0, 1)")
        if not (isinstance(self.corruption_rate, (int, float)) and 0 <= self.corruption_rate < 0.5):
            raise ConfigError("corruption_rate", self.corruption_rate, "must be in [0, 0.5)")
        if not (isinstance(self.clip_range, (int, float)) and math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError("clip_range", self.clip_range, "must be a finite number > 0")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 32):
            raise ConfigError("bits", self.bits, "must be an int in [2, 32]")
        if self.weight_bound is not None and not (math.isfinite(self.weight_bound) and self.weight_bound > 0):
            raise ConfigError("weight_bound", self.weight_bound, "must be None or a finite number > 0")
        if self.graph_seed is not None and (not isinstance(self.graph_seed, bytes) or len(self.graph_seed) < 16):
            raise ConfigError("graph_seed", self.graph_seed, "must be None or at least 16 bytes")
        if not isinstance(self.authenticated, bool):
            raise ConfigError("authenticated", self.authenticated, "must be a bool")
        if not isinstance(self.fail_on_clip, bool):
            raise ConfigError("fail_on_clip", self.fail_on_clip, "must be a bool")
        if not isinstance(self.fail_on_dropout, bool):
            raise ConfigError("fail_on_dropout", self.fail_on_dropout, "must be a bool")
        if self.identities is not None:
            if not self.authenticated:
                raise ConfigError("identities", "given", "identity keys are used only with authenticated=True")
            if not isinstance(self.identities, Mapping):
                raise ConfigError("identities", type(self.identities).__name__, "must map client ids to IdentityKey")
            for u, identity in self.identities.items():
                if not isinstance(identity, IdentityKey):
                    raise ConfigError("identities", u, f"must be an IdentityKey, not {type(identity).__name__}")

    def round_neighbours(self, num_clients: int) -> int | None:
        """The SecAgg+ degree for a round of ``num_clients`` (client counts vary between rounds).

        k is capped at n - 1 and, when n is odd, made even (no k-regular graph on an odd number
        of vertices has odd k); ``None`` stays the complete graph.
        """
        if self.neighbours in (None, "complete") or num_clients < 2:
            return None
        if self.neighbours == "auto":
            chosen = self._auto(num_clients)
            return None if chosen is None else chosen.neighbours
        if not isinstance(self.neighbours, int):  # __post_init__ allows no other string
            raise ConfigError("neighbours", self.neighbours, "must be \"auto\", \"complete\" (or None) or an int >= 1")
        k = min(self.neighbours, num_clients - 1)
        if k % 2 == 1 and num_clients % 2 == 1 and k != num_clients - 1:
            k -= 1
        return k if k >= 1 else None

    def _auto(self, num_clients: int) -> GraphChoice | None:
        """choose_graph's (k, t) for a round, when the graph is automatic and the round above the complete-graph size."""
        from privfl.protocols.secagg.params import COMPLETE_GRAPH_MAX_CLIENTS, choose_graph

        if self.neighbours != "auto" or num_clients <= COMPLETE_GRAPH_MAX_CLIENTS:
            return None
        return choose_graph(num_clients, dropout_rate=self.dropout_rate, corruption_rate=self.corruption_rate)

    def quantizer(self, num_clients: int) -> Quantizer:
        """The quantizer of a round of ``num_clients`` (every party of the round builds this same one).

        Raises:
            ConfigError: the range, bits and fraction bits cannot sum ``num_clients`` values without overflow.
        """
        return Quantizer(clip_range=self.clip_range, bits=self.bits, num_clients=num_clients, fraction_bits=self.fraction_bits)

    def resolve_threshold(self, num_clients: int) -> int:
        """The integer threshold for a round of ``num_clients``.

        A fraction f gives max(ceil(f h), floor(h/2) + 1, 2) for h share holders: the middle term only
        matters when float rounding would land a fraction just above 1/2 on exactly h/2. An int is
        returned as it is, once checked against the bound; one above h makes that round abort later.

        Raises:
            ConfigError: the graph degree is invalid for ``num_clients``, or an int threshold is at or
                below half of this round's share holders.
        """
        chosen = self._auto(num_clients)
        if chosen is not None:
            return chosen.threshold
        holders = check_neighbours(self.round_neighbours(num_clients), num_clients) + 1
        if isinstance(self.threshold, int):
            if self.threshold <= holders:
                check_threshold(self.threshold, holders)
            return self.threshold
        return max(2, min_threshold(holders), math.ceil(self.threshold * holders - 1e-9))

    def check_threshold_bound(self, max_clients: int) -> None:
        """Checks :meth:`resolve_threshold` for every round size from 2 to ``max_clients``.

        Needed on top of checking ``max_clients`` alone: with an odd degree the graph of an odd round
        is one degree sparser (see :meth:`round_neighbours`), so the most share holders can occur in a
        smaller round (neighbours=3: 4 holders at 4 clients, 3 at 5).

        Raises:
            ConfigError: some round size resolves to a threshold at or below half its share holders;
                the message names the round size.
        """
        from privfl.protocols.secagg.params import COMPLETE_GRAPH_MAX_CLIENTS

        # Automatic rounds above the complete-graph size take choose_graph's threshold, which passes
        # the bound by construction: only the complete-graph sizes need checking.
        last = min(max_clients, COMPLETE_GRAPH_MAX_CLIENTS) if self.neighbours == "auto" else max_clients
        for n in range(2, last + 1):
            try:
                self.resolve_threshold(n)
            except ConfigError as exc:
                raise ConfigError(exc.field, exc.value, f"in a round of {n} clients, {exc.reason}") from exc


class SecAggProtection(DistributedNoiseProtection):
    """Bonawitz et al. secure aggregation (optionally SecAgg+), every message through the transport.

    The server learns only the weighted sum over the survivors and the sum of their weights. ``server``
    is the last round's :class:`SecAggServer`, kept so its state can be inspected.
    """

    name: ClassVar[str] = "secagg"
    config: SecAggConfig

    @property
    def min_participants(self) -> int:
        """Secure aggregation needs at least two inputs: the sum of one is that input."""
        return 2

    def check_fits(self, num_clients: int) -> None:
        """Threshold above half the share holders at every round size, and no overflow at the largest.

        Raises:
            ConfigError: either does not hold for rounds of up to ``num_clients`` sites.
        """
        cfg = self.config
        # Every round size, not just the largest: with an odd SecAgg+ degree a smaller round can
        # have more share holders.
        cfg.check_threshold_bound(num_clients)
        cfg.quantizer(num_clients)

    def share_threshold(self, num_clients: int) -> int:
        """See `DistributedNoiseProtection.share_threshold`: the secure-aggregation threshold t."""
        return self.config.resolve_threshold(num_clients)

    @property
    def word_bits(self) -> int:
        """See `DistributedNoiseProtection.word_bits`: the modulus bits k."""
        return self.config.bits

    def use_noise_range(self, clip_range: float, fraction_bits: int) -> None:
        """See `DistributedNoiseProtection.use_noise_range`.

        Also drops ``weight_bound``: noised updates all carry weight 1 (every site counts once), and
        scaling them by 1 / ``weight_bound`` would move each share off the quantizer's grid, so the
        encoding would round the noise instead of carrying it exactly.
        """
        self.config = replace(
            self.config, clip_range=clip_range, fraction_bits=fraction_bits, fail_on_clip=True, fail_on_dropout=True,
            weight_bound=None,
        )

    def __init__(self, config: SecAggConfig | None = None) -> None:
        self.config = config or SecAggConfig()
        self.server: SecAggServer | None = None
        self.clipped: dict[str, int] = {}
        self.max_error: float = 0.0
        self._identities: dict[str, IdentityKey] = dict(self.config.identities or {})

    def _identities_for(self, ids: list[str]) -> dict[str, IdentityKey] | None:
        """Long-term identity keys of this round's clients (authenticated mode), made on first use."""
        if not self.config.authenticated:
            return None
        for u in ids:
            if u not in self._identities:
                if self.config.identities is not None:
                    raise ConfigError("identities", u, "client has no identity key")
                self._identities[u] = IdentityKey.generate()
        return {u: self._identities[u] for u in ids}

    def _setup_round(self, round_index: int, ids: list[str], dim: int, identities: dict[str, IdentityKey] | None) -> RoundRun:
        """Protocol state for this round (raises ConfigError when the graph or threshold cannot fit)."""
        cfg = self.config
        run = new_round(
            ids,
            round_index=round_index,
            threshold=cfg.resolve_threshold(len(ids)),
            neighbours=cfg.round_neighbours(len(ids)),
            dimension=dim + 1,
            bits=cfg.bits,
            graph_seed=cfg.graph_seed,
            identities=identities,
        )
        return run

    def run_round(
        self, round_index: int, updates: Mapping[str, ClientUpdate], transport: Transport, *, release_noise: ReleaseNoise | None = None
    ) -> RoundResult:
        """See :meth:`Protection.run_round` (``release_noise`` is refused: the noise is distributed).

        Raises:
            ProtocolAbort: fewer than ``threshold`` clients complete a step (the message gives the counts),
                or the settings cannot fit this round's client count (e.g. an int threshold above its
                share holders), or ``fail_on_clip`` and a coordinate would be clipped (nothing is sent),
                or ``fail_on_dropout`` and a client dropped out (the average is withheld).
            ConfigError: the configuration does not fit this round (e.g. too few bits for this many
                clients), or its threshold is at or below half of this round's share holders.
        """
        if release_noise is not None:
            raise ConfigError("release_noise", "given", "secure aggregation has no party that sees the sum before release")
        cfg = self.config
        if len(updates) < 2:
            raise ProtocolAbort(f"round {round_index}: {len(updates)} clients; secure aggregation needs 2", survivors=len(updates), threshold=2)
        dims = {u.delta.shape[0] for u in updates.values()}
        if len(dims) != 1:
            raise ProtocolAbort(f"round {round_index}: updates of different lengths {sorted(dims)}")
        (dim,) = dims
        ids = sorted(updates)
        bound = cfg.weight_bound if cfg.weight_bound is not None else max(u.weight for u in updates.values())
        for u in ids:
            if updates[u].weight > bound:
                raise ConfigError("weight_bound", bound, f"client {u!r} has weight {updates[u].weight} above it")
        identities = self._identities_for(ids)
        # A threshold at or below half of this round's share holders is refused outright (ConfigError),
        # not turned into an aborted round below: it is unsafe, not merely a poor fit for this round.
        cfg.resolve_threshold(len(ids))
        quantizer = cfg.quantizer(len(ids))
        try:
            run = self._setup_round(round_index, ids, dim, identities)
        except ConfigError as exc:
            # Settings that cannot fit this round's client count (they vary from round to round):
            # the round is aborted with the reason, and the federation goes on.
            raise ProtocolAbort(f"round {round_index}: secure aggregation cannot run with {len(ids)} clients: {exc}") from exc
        self.server = run.server
        c = float(cfg.clip_range)
        encoded: dict[str, np.ndarray] = {}
        self.clipped = {}
        for u in ids:
            # Client side: clip, scale by r = n_k / W <= 1 (stays within [-c, c]), append r * c, quantize.
            delta = updates[u].delta.astype(np.float64)
            self.clipped[u] = int(np.count_nonzero(np.abs(delta) > c))
            if cfg.fail_on_clip and self.clipped[u]:
                # Fail closed: a clipped noise share is not the accounted noise (client-level DP), so
                # nothing of this round is masked or sent; the caller still charges the round.
                raise ProtocolAbort(
                    f"round {round_index}: client {u!r} has {self.clipped[u]} coordinate(s) beyond clip_range "
                    f"{c:.6g}; fail_on_clip aborts the round before anything is sent"
                )
            ratio = updates[u].weight / bound
            vector = np.empty(dim + 1)
            np.multiply(np.clip(delta, -c, c), ratio, out=vector[:dim])
            vector[dim] = ratio * c
            encoded[u], _ = quantizer.encode(vector, rounding_key())
        words, transcript = drive(run, encoded, transport)
        survivors = run.server.survivors
        self.max_error = quantizer.max_error(len(survivors))
        if cfg.fail_on_dropout and len(survivors) < len(ids):
            # The server has unmasked a sum carrying at least the charged noise; the average is not
            # released to anyone else, since its noise would reveal how many sites survived.
            raise ProtocolAbort(
                f"round {round_index}: {len(ids) - len(survivors)} of {len(ids)} clients dropped out; fail_on_dropout "
                "withholds the average",
                survivors=len(survivors),
                threshold=len(ids),
            )

        # The server sends the unmasked sum back; each client decodes it into the average.
        aggregate = encode_frame(_KIND_AGGREGATE, round_index, SERVER, [words.astype(WORD).tobytes()])
        received = transport.deliver(SERVER, "clients", "aggregate", aggregate)
        if received is None:
            raise ProtocolAbort(f"round {round_index}: the aggregate was lost on its way to the clients")
        try:
            frame = decode_frame(received, kind=_KIND_AGGREGATE, round_index=round_index, sender=SERVER, max_bytes=4 * (dim + 1) + 1024)
            if len(frame.parts) != 1 or len(frame.parts[0]) != 4 * (dim + 1):
                raise MessageError("aggregate has the wrong shape", sender=SERVER)
        except MessageError as exc:
            raise ProtocolAbort(f"round {round_index}: the aggregate is malformed ({exc.reason})") from exc
        decoded = quantizer.decode_sum(np.frombuffer(frame.parts[0], dtype=WORD))
        ratio_sum = decoded[dim] / c
        if not ratio_sum > 0:
            raise ProtocolAbort(f"round {round_index}: decoded total weight {ratio_sum * bound} is not positive")
        dropped = {u: reason for u, reason in run.server.dropped.items() if u not in survivors}
        download = {u: transcript.bytes_down[u] + (len(received) if u in survivors else 0) for u in ids}
        return RoundResult(
            average=decoded[:dim] / ratio_sum,
            total_weight=float(ratio_sum * bound),
            contributors=survivors,
            dropped=dropped,
            upload_bytes={u: sum(transcript.bytes_up[u].values()) for u in ids},
            download_bytes=download,
        )
