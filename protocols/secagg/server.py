"""The server side of secure aggregation: routes sealed shares, sums masked vectors, removes the masks.

The server sees public keys, AES-GCM sealed shares it cannot open, masked vectors (uniform in Z_{2^k}
given the masks), and in the unmask step exactly one kind of share per client: b-shares of survivors,
s-key shares of clients that dropped after sharing. It keeps a running sum of the masked vectors, never
an individual unmasked one.

Threat model: honest-but-curious by default. With ``params.identities`` set (authenticated mode) an
honest server also checks each client's signature on its keys, forwards the signatures, and runs the
consistency check (collect signatures on the survivor set, forward them with the unmask request) that
lets honest clients detect an active server; see docs/secagg.md for what that does and does not stop.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable

import numpy as np

from privfl.errors import MessageError, ProtocolAbort, ProtocolError
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg import shamir
from privfl.protocols.secagg.client import (
    SEALED_SHARE_BYTES,
    keys_statement,
    pairwise_mask_key,
    self_mask_key,
    survivor_bitmap,
    survivors_statement,
)
from privfl.protocols.secagg.graph import components
from privfl.protocols.secagg.keys import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    TAG_BYTES,
    KeyPair,
    agree,
    hkdf,
    private_key_from_bytes,
    verify_signature,
    verify_tag,
)
from privfl.protocols.secagg.params import RoundParams, check_threshold
from privfl.protocols.secagg.prg import WORD, apply_masks
from privfl.protocols.wire import Frame

__all__ = ["SecAggServer"]

SERVER = "server"


class SecAggServer:
    """The server's state for one round.

    Args:
        params: the round's public parameters; ``params.server_public_key`` must be ``key.public``.
        key: the server's X25519 pair (for message authentication only).
        threads: threads for removing the masks in :meth:`finish` (AES keystream expansion); None uses
            every CPU the process may run on. The result does not depend on it.
        authenticate_vectors: verify the GMAC tag of each masked vector (the default). False skips it,
            and only it (every other message stays authenticated); that is safe only where the transport
            already authenticates each client to this server and protects the bytes end to end (TLS with
            client/node authentication terminating in this process), since this server is the only
            party that ever checks the tag. It saves one pass over every masked vector. See
            docs/secagg.md, "Authenticating the masked vectors".

    Raises:
        ConfigError: the threshold is at or below half the share holders (see :func:`check_threshold`).

    Usage per step: call ``receive_*`` for each client message that arrived (a bad one raises
    :class:`MessageError` and drops its sender), then the step's closing method, which returns the
    messages to send, one per client still in the round.
    """

    def __init__(self, params: RoundParams, key: KeyPair, threads: int | None = None, *, authenticate_vectors: bool = True) -> None:
        if key.public != params.server_public_key:
            raise ProtocolError("server key does not match the round parameters")
        # An honest server will not run a round its clients would refuse (RoundParams checks it too).
        check_threshold(params.threshold, params.holders)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ProtocolError(f"threads must be None or an int >= 1, not {threads!r}")
        if not isinstance(authenticate_vectors, bool):
            raise ProtocolError(f"authenticate_vectors must be a bool, not {authenticate_vectors!r}")
        self.params = params
        self.authenticate_vectors = authenticate_vectors
        self.threads = threads if threads is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._key = key
        self._channels: dict[str, bytes] = {}
        self._step = m.ADVERTISE
        self.dropped: dict[str, str] = {}
        self._public_keys: dict[str, tuple[bytes, bytes]] = {}
        self._key_signatures: dict[str, bytes] = {}
        self._survivor_signatures: dict[str, bytes] = {}
        self._signed_statement = b""  # authenticated mode: the consistency statement on this round's survivor bitmap
        self._keys_sent: dict[str, frozenset[str]] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}  # receiver -> sender -> sealed share
        self._shared: set[str] = set()
        self._relayed: dict[str, frozenset[str]] = {}
        # Masked vectors are summed on arrival, while still in cache from tag verification; only each
        # sender's tag is kept (to recognise an exact repeat), never the vector.
        self._masked_tags: dict[str, bytes] = {}
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

    def _open(self, sender: str, payload: bytes, kind: int, max_bytes: int) -> Frame:
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
            signed = self.params.authenticated
            keys = frame.parts[:2]
            if len(frame.parts) != 2 + signed or any(len(k) != KEY_BYTES for k in keys) or keys[0] == keys[1]:
                raise MessageError("advertise must carry two distinct 32-byte keys" + (" and a signature" if signed else ""), sender=sender)
            channel = self._channel(sender, keys[0])
            key = m.channel_key(channel, self.params.round_index, sender, m.ADVERTISE, m.UP)
            verify_tag(key, body, got_tag, sender=sender)
            if signed:
                # The channel tag is keyed from the advertised key itself; only the signature ties the
                # keys to the client's registered identity.
                statement = keys_statement(self.params, sender, keys[0], keys[1])
                verify_signature(self.params.identity_key(sender), frame.parts[2], statement, signer=sender)
                self._key_signatures[sender] = frame.parts[2]
        except MessageError as exc:
            self._channels.pop(sender, None)
            self.drop(sender, f"advertise: {exc.reason}")
            raise
        self._public_keys[sender] = (keys[0], keys[1])

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
                if self.params.authenticated:
                    parts.append(self._key_signatures[v])
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
            raise self._reject(sender, m.SHARES, f"{len(frame.parts)} parts, expected {2 * len(expected)} (id and sealed share for each of {len(expected)} neighbours)")
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

        Only the sum and each sender's 16-byte tag are kept, not the vectors (O(d) memory, not O(n d)).
        A repeat of a message, which must authenticate like the original, is subtracted again: an exact
        replay (same tag) takes the sender's input out of the round. A different message that also
        authenticates can come only from the sender itself (it holds the one-time key): it is refused,
        the first input stays in the sum, and the sender is treated as dropped after masked input (its
        b_u is rebuilt from the others' shares, as for any client that leaves at that point).

        Raises:
            MessageError: unknown/repeated sender, malformed or unauthenticated message, wrong length.
        """
        self._check_step(m.MASKED_INPUT)
        repeat = sender in self._masked_tags
        if not repeat:
            if sender not in self._relayed:
                raise self._reject(sender, m.MASKED_INPUT, "not expected at this step")
            if sender in self.dropped:
                raise MessageError(f"client already dropped ({self.dropped[sender]})", sender=sender)
        key = m.channel_key(self._channels[sender], self.params.round_index, sender, m.MASKED_INPUT, m.UP) if self.authenticate_vectors else None
        round_index, length = self.params.round_index, self.params.dimension
        try:
            if not repeat:
                # The words are added only once authenticated: a rejected message leaves the sum as it was.
                self._masked_tags[sender] = m.add_vector(
                    self._masked_sum, payload, kind=m.MASKED_INPUT, round_index=round_index, sender=sender, length=length, key=key
                )
                return
            vector = m.open_vector(payload, kind=m.MASKED_INPUT, round_index=round_index, sender=sender, length=length, key=key)
        except MessageError as exc:
            self.drop(sender, f"masked_input: {exc.reason}")
            raise
        if bytes(payload[-TAG_BYTES:]) == self._masked_tags[sender]:
            # An exact repeat makes the sender's input ambiguous: take it out of the round altogether.
            np.subtract(self._masked_sum, vector, out=self._masked_sum)
            del self._masked_tags[sender]
            raise self._reject(sender, m.MASKED_INPUT, "duplicate message")
        raise self._reject(sender, m.MASKED_INPUT, "duplicate message (a different one; the first stays in the sum)")

    @property
    def masked_inputs(self) -> frozenset[str]:
        """The clients whose masked input is in the sum so far (round 2)."""
        return frozenset(self._masked_tags)

    def _close_masked_input(self) -> None:
        for u in self._relayed:
            if u not in self._masked_tags:
                self.drop(u, "masked_input: no message")
        # Every input in the sum is a survivor's, even if its sender left after sending it: its self
        # mask must be removed, so its b_u is rebuilt like that of any client that drops before unmask.
        survivors = set(self._masked_tags)
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

    def consistency_requests(self) -> dict[str, bytes]:
        """Authenticated mode: closes round 2 by sending every survivor the survivor set U3 to sign.

        Raises:
            ProtocolError: the round is not authenticated.
            ProtocolAbort: as :meth:`unmask_requests` in the plain mode.
        """
        self._check_step(m.MASKED_INPUT)
        if not self.params.authenticated:
            raise ProtocolError("server: the consistency check exists in authenticated mode only")
        self._close_masked_input()
        packed = survivor_bitmap(self.params, self.survivors)
        self._signed_statement = survivors_statement(self.params, packed)  # what every signature must be over
        out = {u: self._send(u, m.CHECK_REQUEST, [packed]) for u in self.survivors}
        self._step = m.CHECK
        return out

    def receive_consistency(self, sender: str, payload: bytes) -> None:
        """Authenticated mode: takes a survivor's signature on U3 and checks it.

        Raises:
            MessageError: unknown/repeated sender, malformed message, or a signature that does not verify.
        """
        self._check_step(m.CHECK)
        if sender in self._survivor_signatures:
            self._survivor_signatures.pop(sender)
            raise self._reject(sender, m.CHECK, "duplicate message")
        if sender not in self.survivors:
            raise self._reject(sender, m.CHECK, "not expected at this step")
        frame = self._open(sender, payload, m.CHECK, max_bytes=1024)
        if len(frame.parts) != 1 or len(frame.parts[0]) != SIGNATURE_BYTES:
            raise self._reject(sender, m.CHECK, "consistency answer must be one signature")
        try:
            verify_signature(self.params.identity_key(sender), frame.parts[0], self._signed_statement, signer=sender)
        except MessageError as exc:
            raise self._reject(sender, m.CHECK, exc.reason) from exc
        self._survivor_signatures[sender] = frame.parts[0]

    def unmask_requests(self) -> dict[str, bytes]:
        """Asks each survivor for b-shares of survivors and s-shares of dropped clients.

        Plain mode: closes round 2. Authenticated mode: closes the consistency check; only the survivors
        that signed U3 are asked, and each request carries the signatures of the client's share holders.

        Raises:
            ProtocolAbort: fewer than ``threshold`` masked inputs (or signatures), or the survivors' graph
                is disconnected.
        """
        authenticated = self.params.authenticated
        if authenticated:
            self._check_step(m.CHECK)
            for u in self.survivors:
                if u not in self._survivor_signatures:
                    self.drop(u, "consistency: no message")
            asked = tuple(u for u in self.survivors if u in self._survivor_signatures and u not in self.dropped)
            self._require(asked, "consistency")
        else:
            self._check_step(m.MASKED_INPUT)
            self._close_masked_input()
            asked = self.survivors
        survivors = frozenset(self.survivors)
        packed_survivors = survivor_bitmap(self.params, survivors)
        asked_set = frozenset(asked)
        out = {}
        for u in asked:
            relayed = self._relayed[u]
            want_b = frozenset((relayed | {u}) & survivors)
            want_s = frozenset(relayed - survivors)
            self._requested[u] = (want_b, want_s)
            parts = [packed_survivors, m.pack_ids(want_b), m.pack_ids(want_s)]
            if authenticated:
                signers = sorted((self.params.graph[u] | {u}) & asked_set)
                parts += [m.pack_ids(signers), b"".join(self._survivor_signatures[v] for v in signers)]
            out[u] = self._send(u, m.UNMASK_REQUEST, parts)
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
            # Nothing more from it is read this round (its input, already in the sum, stays there).
            self.drop(sender, "unmask: duplicate message")
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
        challenge = 1 + secrets.randbelow(shamir.PRIME - 1)  # one random parity check per round, see shamir.consistent
        for owner in self.survivors:
            got = len(self._b_shares.get(owner, {}))
            if got < t:
                raise ProtocolAbort(f"client {owner!r}: {got} self-mask shares < threshold {t}", survivors=got, threshold=t)
            # A self-mask seed has no public commitment to check the rebuilt value against: the only
            # evidence of a wrong share is shares that do not lie on one polynomial.
            if not shamir.consistent(self._b_shares[owner], t, challenge=challenge):
                raise ProtocolAbort(f"client {owner!r}: self-mask shares are inconsistent")
        for owner in needs_s:
            got = len(self._s_shares.get(owner, {}))
            if got < t:
                raise ProtocolAbort(f"client {owner!r}: {got} mask-key shares < threshold {t}", survivors=got, threshold=t)
            if not shamir.consistent(self._s_shares[owner], t, challenge=challenge):
                raise ProtocolAbort(f"client {owner!r}: mask key shares are inconsistent")
        streams: list[tuple[bytes, int]] = []
        for owner in self.survivors:
            try:
                seed = shamir.int_to_secret(shamir.reconstruct(self._b_shares[owner], t))
            except ProtocolError as exc:
                raise ProtocolAbort(f"client {owner!r}: self-mask shares are inconsistent") from exc
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
                    streams.append((pairwise_mask_key(shared, p.round_index, u, dropped, p.mask_context), -p.sign(u, dropped)))
        total, self._masked_sum = self._masked_sum, np.zeros(0, dtype=WORD)
        self._masked_tags.clear()
        apply_masks(total, streams, threads=self.threads)
        if p.bits < 32:
            np.bitwise_and(total, np.uint32(p.modulus_mask), out=total)
        return total
