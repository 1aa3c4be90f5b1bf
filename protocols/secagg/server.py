"""The server side of secure aggregation: routes sealed shares, sums masked vectors, removes the masks.

The server sees public keys, AES-GCM sealed shares it cannot open, masked vectors (uniform in Z_{2^k}
given the masks), and in the unmask step exactly one kind of share per client: b-shares of survivors,
s-key shares of clients that dropped after sharing. It keeps a running sum of the masked vectors, never
an individual unmasked one.

Threat model: honest-but-curious. It follows the protocol; an active server that lies about who dropped
is out of scope here (see docs/secagg.md for the signed-key and consistency-check defence).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from privfl.errors import MessageError, ProtocolAbort, ProtocolError
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg import shamir
from privfl.protocols.secagg.client import SEALED_SHARE_BYTES, pairwise_mask_key, self_mask_key
from privfl.protocols.secagg.graph import components
from privfl.protocols.secagg.keys import KEY_BYTES, KeyPair, agree, hkdf, private_key_from_bytes, verify_tag
from privfl.protocols.secagg.params import RoundParams
from privfl.protocols.secagg.prg import WORD, apply_masks

__all__ = ["SecAggServer"]

SERVER = "server"


class SecAggServer:
    """The server's state for one round.

    Args:
        params: the round's public parameters; ``params.server_public_key`` must be ``key.public``.
        key: the server's X25519 pair (for message authentication only).

    Usage per step: call ``receive_*`` for each client message that arrived (a bad one raises
    :class:`MessageError` and drops its sender), then the step's closing method, which returns the
    messages to send, one per client still in the round.
    """

    def __init__(self, params: RoundParams, key: KeyPair) -> None:
        if key.public != params.server_public_key:
            raise ProtocolError("server key does not match the round parameters")
        self.params = params
        self._key = key
        self._channels: dict[str, bytes] = {}
        self._step = m.ADVERTISE
        self.dropped: dict[str, str] = {}
        self._public_keys: dict[str, tuple[bytes, bytes]] = {}
        self._keys_sent: dict[str, frozenset[str]] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}  # receiver -> sender -> sealed share
        self._shared: set[str] = set()
        self._relayed: dict[str, frozenset[str]] = {}
        # Masked vectors are summed on arrival, while still in cache from tag verification; the views
        # are kept only so that a duplicate can be taken back out of the sum.
        self._masked: dict[str, np.ndarray] = {}
        self._masked_sum = np.zeros(params.dimension, dtype=WORD)
        self._requested: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._b_shares: dict[str, dict[int, int]] = {}
        self._s_shares: dict[str, dict[int, int]] = {}
        self._responders: set[str] = set()
        self.survivors: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"SecAggServer(round_index={self.params.round_index}, step={m.STEP_NAMES.get(self._step, 'done')})"

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def active(self) -> frozenset[str]:
        """Clients still taking part."""
        return frozenset(u for u in self.params.client_ids if u not in self.dropped)

    def drop(self, client_id: str, reason: str) -> None:
        """Records that a client left the round (lost message, client-side error, bad message)."""
        if client_id in self.params.index and client_id not in self.dropped:
            self.dropped[client_id] = reason

    def _check_step(self, step: int) -> None:
        if self._step != step:
            raise ProtocolError(f"server: {m.STEP_NAMES[step]} out of order")

    def _channel(self, client_id: str, client_c_pk: bytes) -> bytes:
        secret = self._channels.get(client_id)
        if secret is None:
            secret = hkdf(agree(self._key.private, client_c_pk, sender=client_id), b"channel-secret", self.params.round_index, client_id)
            self._channels[client_id] = secret
        return secret

    def _open(self, sender: str, payload: bytes, kind: int, max_bytes: int):
        if sender not in self.params.index:
            raise MessageError("unknown client id", sender=sender)
        if sender in self.dropped:
            raise MessageError(f"client already dropped ({self.dropped[sender]})", sender=sender)
        try:
            key = m.channel_key(self._channels[sender], self.params.round_index, sender, kind, m.UP)
            frame, _, _ = m.open_message(
                payload, kind=kind, round_index=self.params.round_index, sender=sender, max_bytes=max_bytes, key=key
            )
        except MessageError as exc:
            self.drop(sender, f"{m.STEP_NAMES[kind]}: {exc.reason}")
            raise
        return frame

    def _reject(self, sender: str, kind: int, reason: str) -> MessageError:
        self.drop(sender, f"{m.STEP_NAMES[kind]}: {reason}")
        return MessageError(reason, sender=sender)

    def _send(self, client_id: str, kind: int, parts: list[bytes]) -> bytes:
        key = m.channel_key(self._channels[client_id], self.params.round_index, client_id, kind, m.DOWN)
        return m.seal_message(key, kind, self.params.round_index, SERVER, parts)

    def _require(self, alive: Iterable[str], what: str) -> None:
        count = len(set(alive))
        t = self.params.threshold
        if count < t:
            self._step = -1
            raise ProtocolAbort(f"{count} survivors < threshold {t} ({what})", survivors=count, threshold=t)

    def _prune(self, alive: set[str], reason: str) -> set[str]:
        # A client with fewer than t live share holders could never be unmasked: drop it, then its
        # neighbours lose a holder, so repeat until stable.
        t = self.params.threshold
        changed = True
        while changed:
            changed = False
            for u in sorted(alive):
                if len(self.params.graph[u] & alive) + 1 < t:
                    alive.discard(u)
                    self.drop(u, reason)
                    changed = True
        return alive

    # -- round 0 -------------------------------------------------------------------------------
    def receive_advertise(self, sender: str, payload: bytes) -> None:
        """Takes a client's two public keys.

        Raises:
            MessageError: unknown or repeated sender, malformed or unauthenticated message.
        """
        self._check_step(m.ADVERTISE)
        if sender not in self.params.index:
            raise MessageError("unknown client id", sender=sender)
        if sender in self._public_keys:
            self._public_keys.pop(sender)
            raise self._reject(sender, m.ADVERTISE, "duplicate message")
        if sender in self.dropped:
            raise MessageError(f"client already dropped ({self.dropped[sender]})", sender=sender)
        try:
            frame, body, got_tag = m.open_message(
                payload, kind=m.ADVERTISE, round_index=self.params.round_index, sender=sender, max_bytes=1024, key=None
            )
            if len(frame.parts) != 2 or any(len(k) != KEY_BYTES for k in frame.parts) or frame.parts[0] == frame.parts[1]:
                raise MessageError("advertise must carry two distinct 32-byte keys", sender=sender)
            channel = self._channel(sender, frame.parts[0])
            key = m.channel_key(channel, self.params.round_index, sender, m.ADVERTISE, m.UP)
            verify_tag(key, body, got_tag, sender=sender)
        except MessageError as exc:
            self._channels.pop(sender, None)
            self.drop(sender, f"advertise: {exc.reason}")
            raise
        self._public_keys[sender] = (frame.parts[0], frame.parts[1])

    def keys_messages(self) -> dict[str, bytes]:
        """Closes round 0: each live client gets its live neighbours' public keys.

        Raises:
            ProtocolAbort: fewer than ``threshold`` clients advertised.
        """
        self._check_step(m.ADVERTISE)
        for u in self.params.client_ids:
            if u not in self._public_keys:
                self.drop(u, "advertise: no message")
        alive = set(self._public_keys) - set(self.dropped)
        self._require(alive, "advertise")
        alive = self._prune(alive, "advertise: fewer than threshold live neighbours")
        self._require(alive, "advertise")
        out = {}
        for u in sorted(alive):
            peers = sorted(self.params.graph[u] & alive)
            self._keys_sent[u] = frozenset(peers)
            parts: list[bytes] = []
            for v in peers:
                parts += [v.encode("utf-8"), *self._public_keys[v]]
            out[u] = self._send(u, m.KEYS, parts)
        self._step = m.SHARES
        return out

    # -- round 1 -------------------------------------------------------------------------------
    def receive_shares(self, sender: str, payload: bytes) -> None:
        """Takes a client's sealed shares, one for each neighbour it was given keys for.

        Raises:
            MessageError: unknown/repeated sender, malformed message, missing or extra recipients.
        """
        self._check_step(m.SHARES)
        if sender in self._shared:
            self._shared.discard(sender)
            raise self._reject(sender, m.SHARES, "duplicate message")
        expected = self._keys_sent.get(sender, frozenset())
        frame = self._open(sender, payload, m.SHARES, max_bytes=4096 + len(expected) * (SEALED_SHARE_BYTES + 300))
        if len(frame.parts) != 2 * len(expected):
            raise self._reject(sender, m.SHARES, f"{len(frame.parts) // 2} shares, expected {len(expected)}")
        sealed: dict[str, bytes] = {}
        for i in range(0, len(frame.parts), 2):
            receiver = frame.parts[i].decode("utf-8", errors="replace")
            if receiver not in expected or receiver in sealed:
                raise self._reject(sender, m.SHARES, f"share for unexpected or repeated receiver {receiver!r}")
            if len(frame.parts[i + 1]) != SEALED_SHARE_BYTES:
                raise self._reject(sender, m.SHARES, "sealed share of wrong length")
            sealed[receiver] = frame.parts[i + 1]
        for receiver, blob in sealed.items():
            self._sealed.setdefault(receiver, {})[sender] = blob
        self._shared.add(sender)

    def relay_messages(self) -> dict[str, bytes]:
        """Closes round 1: each client that shared gets the sealed shares addressed to it.

        Raises:
            ProtocolAbort: fewer than ``threshold`` clients shared.
        """
        self._check_step(m.SHARES)
        for u in self._keys_sent:
            if u not in self._shared:
                self.drop(u, "share: no message")
        alive = self._shared - set(self.dropped)
        self._require(alive, "share")
        alive = self._prune(alive, "share: fewer than threshold live neighbours")
        self._require(alive, "share")
        out = {}
        for v in sorted(alive):
            senders = sorted(u for u in self._sealed.get(v, {}) if u in alive)
            self._relayed[v] = frozenset(senders)
            parts: list[bytes] = []
            for u in senders:
                parts += [u.encode("utf-8"), self._sealed[v][u]]
            out[v] = self._send(v, m.RELAY, parts)
        self._sealed.clear()
        self._step = m.MASKED_INPUT
        return out

    # -- round 2 -------------------------------------------------------------------------------
    def receive_masked_input(self, sender: str, payload: bytes) -> None:
        """Authenticates a client's masked vector and adds it to the running sum.

        Raises:
            MessageError: unknown/repeated sender, malformed message, wrong length.
        """
        self._check_step(m.MASKED_INPUT)
        if sender in self._masked:
            # A repeat makes the sender's input ambiguous: take it out of the round altogether.
            np.subtract(self._masked_sum, self._masked.pop(sender), out=self._masked_sum)
            raise self._reject(sender, m.MASKED_INPUT, "duplicate message")
        if sender not in self._relayed:
            raise self._reject(sender, m.MASKED_INPUT, "not expected at this step")
        if sender in self.dropped:
            raise MessageError(f"client already dropped ({self.dropped[sender]})", sender=sender)
        key = m.channel_key(self._channels[sender], self.params.round_index, sender, m.MASKED_INPUT, m.UP)
        try:
            vector = m.open_vector(
                payload, kind=m.MASKED_INPUT, round_index=self.params.round_index, sender=sender, length=self.params.dimension, key=key
            )
        except MessageError as exc:
            self.drop(sender, f"masked_input: {exc.reason}")
            raise
        np.add(self._masked_sum, vector, out=self._masked_sum)
        self._masked[sender] = vector

    def unmask_requests(self) -> dict[str, bytes]:
        """Closes round 2: asks each survivor for b-shares of survivors and s-shares of dropped clients.

        Raises:
            ProtocolAbort: fewer than ``threshold`` masked inputs, or the survivors' graph is disconnected.
        """
        self._check_step(m.MASKED_INPUT)
        for u in self._relayed:
            if u not in self._masked:
                self.drop(u, "masked_input: no message")
        for u in [u for u in self._masked if u in self.dropped]:
            np.subtract(self._masked_sum, self._masked.pop(u), out=self._masked_sum)
        survivors = set(self._masked)
        self._require(survivors, "masked_input")
        parts_count = components(self.params.graph, survivors)
        if parts_count != 1:
            self._step = -1
            raise ProtocolAbort(f"survivors' masking graph has {parts_count} components; the sum would expose partial sums")
        # Check every secret can be rebuilt from the survivors' shares before asking for any share.
        t = self.params.threshold
        holders_of: dict[str, int] = {u: 1 for u in survivors}
        for u in survivors:
            for v in self._relayed[u]:
                holders_of[v] = holders_of.get(v, 1 if v in survivors else 0) + 1
        for owner, count in sorted(holders_of.items()):
            if count < t:
                self._step = -1
                raise ProtocolAbort(
                    f"client {owner!r}: {count} surviving share holders < threshold {t}", survivors=count, threshold=t
                )
        self.survivors = tuple(sorted(survivors))
        packed_survivors = m.pack_ids(survivors)
        out = {}
        for u in self.survivors:
            relayed = self._relayed[u]
            want_b = frozenset((relayed | {u}) & survivors)
            want_s = frozenset(relayed - survivors)
            self._requested[u] = (want_b, want_s)
            out[u] = self._send(u, m.UNMASK_REQUEST, [packed_survivors, m.pack_ids(want_b), m.pack_ids(want_s)])
        self._step = m.UNMASK
        return out

    # -- round 3 -------------------------------------------------------------------------------
    def receive_unmask(self, sender: str, payload: bytes) -> None:
        """Takes a survivor's shares; they must be exactly the ones asked for.

        Raises:
            MessageError: unknown/repeated sender, malformed message, missing or extra shares.
        """
        self._check_step(m.UNMASK)
        if sender in self._responders:
            # Its input stays in the sum (it survived), but shares from a client that repeats itself
            # are not trusted: take them all back out.
            self._responders.discard(sender)
            x = self.params.index[sender]
            for table in (self._b_shares, self._s_shares):
                for shares in table.values():
                    shares.pop(x, None)
            raise MessageError("duplicate message", sender=sender)
        if sender not in self._requested:
            raise self._reject(sender, m.UNMASK, "not expected at this step")
        want_b, want_s = self._requested[sender]
        expected = len(want_b) + len(want_s)
        frame = self._open(sender, payload, m.UNMASK, max_bytes=4096 + expected * 400)
        if len(frame.parts) != 3 * expected:
            raise self._reject(sender, m.UNMASK, "wrong number of shares")
        b_got: dict[str, int] = {}
        s_got: dict[str, int] = {}
        for i in range(0, len(frame.parts), 3):
            kind, owner, raw = frame.parts[i], frame.parts[i + 1].decode("utf-8", errors="replace"), frame.parts[i + 2]
            target, allowed = (b_got, want_b) if kind == b"b" else (s_got, want_s) if kind == b"s" else (None, frozenset())
            if target is None or owner not in allowed or owner in target or len(raw) != shamir.SHARE_BYTES:
                raise self._reject(sender, m.UNMASK, "unrequested, repeated or malformed share")
            value = int.from_bytes(raw, "big")
            if value >= shamir.PRIME:
                raise self._reject(sender, m.UNMASK, "share outside the field")
            target[owner] = value
        x = self.params.index[sender]
        for owner, value in b_got.items():
            self._b_shares.setdefault(owner, {})[x] = value
        for owner, value in s_got.items():
            self._s_shares.setdefault(owner, {})[x] = value
        self._responders.add(sender)

    def finish(self) -> np.ndarray:
        """Closes round 3: rebuilds the seeds, removes every mask, returns the sum mod 2^k.

        Only self-masks of survivors and pairwise masks between a dropped client and its surviving
        neighbours are expanded; survivor-survivor pairs cancel in the sum and are never touched.

        Returns:
            ``uint32`` words: sum over ``survivors`` of their encoded inputs, mod 2^k.

        Raises:
            ProtocolAbort: fewer than ``threshold`` survivors answered, or some secret has fewer than
                ``threshold`` shares (or its shares are inconsistent).
        """
        self._check_step(m.UNMASK)
        p = self.params
        t = p.threshold
        for u in self._requested:
            if u not in self._responders:
                self.drop(u, "unmask: no message")
        self._step = -1
        self._require(self._responders, "unmask")
        needs_s = sorted({v for u in self.survivors for v in self._relayed[u] if v not in self.survivors})
        for owner in self.survivors:
            got = len(self._b_shares.get(owner, {}))
            if got < t:
                raise ProtocolAbort(f"client {owner!r}: {got} self-mask shares < threshold {t}", survivors=got, threshold=t)
        for owner in needs_s:
            got = len(self._s_shares.get(owner, {}))
            if got < t:
                raise ProtocolAbort(f"client {owner!r}: {got} mask-key shares < threshold {t}", survivors=got, threshold=t)
        streams: list[tuple[bytes, int]] = []
        for owner in self.survivors:
            seed = shamir.int_to_secret(shamir.reconstruct(self._b_shares[owner], t))
            streams.append((self_mask_key(seed, p.round_index, owner), -1))
        for dropped in needs_s:
            try:
                private = private_key_from_bytes(shamir.int_to_secret(shamir.reconstruct(self._s_shares[dropped], t)))
            except ProtocolError as exc:
                raise ProtocolAbort(f"client {dropped!r}: mask key shares are inconsistent") from exc
            if private.public_key().public_bytes_raw() != self._public_keys[dropped][1]:
                raise ProtocolAbort(f"client {dropped!r}: rebuilt mask key does not match its public key")
            for u in self.survivors:
                if dropped in self._relayed[u]:
                    shared = agree(private, self._public_keys[u][1], sender=u)
                    # u added sign(u, dropped) * PRG(s_u,dropped); take it back out.
                    streams.append((pairwise_mask_key(shared, p.round_index, u, dropped), -p.sign(u, dropped)))
        total, self._masked_sum = self._masked_sum, np.zeros(0, dtype=WORD)
        self._masked.clear()
        apply_masks(total, streams)
        if p.bits < 32:
            np.bitwise_and(total, np.uint32(p.modulus_mask), out=total)
        return total
