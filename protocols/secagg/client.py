"""The client side of secure aggregation: a state machine that takes and returns only bytes.

Round by round (Bonawitz et al. 2017, with the SecAgg+ graph of Bell et al. 2020):

0. advertise: fresh X25519 pairs c (share encryption) and s (pairwise masks); send both public keys.
1. share: receive the neighbours' keys; Shamir-share s_sk and a fresh 32-byte self-mask seed b among the
   neighbours and itself (threshold t); each neighbour's share pair is AES-GCM sealed under
   HKDF(X25519(c_u, c_v)) with associated data binding sender, receiver and round, then sent via the server.
2. masked input: receive the shares sent to us; y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv) mod 2^k,
   over the neighbours v whose shares arrived (s_uv = HKDF(X25519(s_u, s_v)), sign +1 iff u sorts before v).
3. unmask: for each client the server names, reveal either its b-share (it survived) or its s-share (it
   dropped), never both for the same client: with both the server could strip every mask from that
   client's late-arriving y.

Before round 0 the client checks the public parameters itself (the server may have chosen them): it
refuses a round whose threshold is at or below half the share holders, where a server that lies about
who dropped could collect both kinds of shares of one client (see :mod:`.params`).

Authenticated mode (``params.identities`` set; Bonawitz et al.'s defence against an active server):
round 0 also signs (round, server key, id, c_pk, s_pk) with the client's long-term Ed25519 identity, and
a client aborts, before sharing anything, if a neighbour's keys arrive without a valid signature by that
neighbour's registered identity. Between masked input and unmask a consistency check runs: the server
sends the survivor set U3, the client signs (round, server key, U3), and the unmask request must carry
the same U3 and at least t valid signatures on it from the client's share holders, or the client aborts
without revealing any share.

Cost. A client's steps work on its own neighbourhood (k + 1 share holders: their ids, keys and shares,
besides its vector), plus, in the consistency and unmask steps, one n-bit survivor bitmap (U3 as bits
over the cycle positions of the graph, ``RoundParams.ring``). Membership tests look up only the
client's share holders, one bit each. The two checks that protect the client stay global but cost
O(n / 64) machine words: |U3| >= t (a popcount) and U3 connected (:func:`graph.ring_connected`, O(log k)
shifts and masks of the bitmap; :meth:`SecAggClient._check_survivors` says why it is not replaced by
a check of the client's own neighbourhood). The signed consistency statement carries a SHA-256
digest of the bitmap, so each of the at most k + 1 signature checks hashes 32 bytes, not the set.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

import numpy as np

from privfl.errors import ConfigError, MessageError, ProtocolAbort, ProtocolError
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg import shamir
from privfl.protocols.secagg.graph import check_neighbours, components, neighbours_of, ring_connected, ring_positions
from privfl.protocols.secagg.keys import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    IdentityKey,
    KeyPair,
    agree,
    hkdf,
    info,
    open_sealed,
    seal,
    verify_signature,
)
from privfl.protocols.secagg.params import RoundParams, check_threshold
from privfl.protocols.secagg.prg import WORD, apply_masks, mask_key
from privfl.protocols.wire import Frame

__all__ = [
    "SEALED_SHARE_BYTES",
    "SecAggClient",
    "keys_statement",
    "pairwise_mask_key",
    "self_mask_key",
    "share_key",
    "survivor_bitmap",
    "survivors_statement",
]

SERVER = "server"
SEALED_SHARE_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16


def self_mask_key(seed: bytes, round_index: int, owner: str) -> bytes:
    """AES key of PRG(b_u)."""
    return mask_key(seed, info(b"self-mask", round_index, owner))


def pairwise_mask_key(shared: bytes, round_index: int, a: str, b: str, context: bytes = b"") -> bytes:
    """AES key of PRG(s_ab) from the X25519 secret of a and b (symmetric in a, b).

    ``context`` (the round's ``mask_context``, each client's own) is bound into the key: if a server
    told two clients different public values (say, clip norms), their pairwise masks do not cancel.
    """
    lo, hi = sorted((a, b))
    if context:
        return mask_key(shared, info(b"pairwise-mask-in-context", round_index, lo, hi, context))
    return mask_key(shared, info(b"pairwise-mask", round_index, lo, hi))


def share_key(shared: bytes, round_index: int, a: str, b: str) -> bytes:
    """AES-GCM key for shares between a and b (symmetric; direction lives in the associated data)."""
    lo, hi = sorted((a, b))
    return hkdf(shared, b"share-encryption", round_index, lo, hi)


def share_associated_data(round_index: int, sender: str, receiver: str) -> bytes:
    """What a sealed share is bound to: who sent it, to whom, in which round."""
    return info(b"share", round_index, sender, receiver)


def keys_statement(params: RoundParams, owner: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a client signs in round 0: its two public keys, bound to its id, the round and the server key."""
    return info(b"advertise-signature", params.round_index, params.server_public_key, owner, c_pk, s_pk)


def survivor_bitmap(params: RoundParams, survivors: Iterable[str]) -> bytes:
    """The survivor set U3 as the server sends it: a bitmap over the clients' cycle positions (``params.ring``)."""
    return m.pack_members((params.ring[u] for u in survivors), len(params.client_ids))


def survivors_statement(params: RoundParams, survivors: bytes) -> bytes:
    """What a client signs in the consistency check: U3 (the SHA-256 of its bitmap), bound to the round and server key.

    Args:
        survivors: the survivor bitmap, as :func:`survivor_bitmap` makes it (it has one encoding per set).
    """
    digest = hashlib.sha256(survivors).digest()
    return info(b"consistency-signature-bitmap", params.round_index, params.server_public_key, digest)


def _check_params(params: RoundParams, client_id: str) -> None:
    """An honest client's own check of the public parameters before it takes part.

    The client reads only its own row of ``params.graph`` and the cycle positions ``params.ring`` (the
    order of the survivor bitmaps; connectivity is checked on the cycle the seed gives), so those are
    what it rebuilds from the seed and compares. The graph is k-regular, so every client has k + 1
    share holders.

    Raises:
        ProtocolAbort: the graph does not follow from (client ids, neighbours, graph seed), or the
            threshold is at or below half the share holders of some client.
    """
    try:
        k = check_neighbours(params.neighbours, len(params.client_ids))
        own = neighbours_of(params.client_ids, params.neighbours, params.graph_seed, client_id)
        ring = ring_positions(params.client_ids, params.neighbours, params.graph_seed)
        if params.graph.get(client_id) != own or (params.ring is not ring and params.ring != ring):
            raise ProtocolAbort("round parameters: the masking graph does not follow from its public seed")
        holders = k + 1
        t = params.threshold
        if not isinstance(t, int) or isinstance(t, bool) or not 2 <= t <= holders:
            raise ConfigError("threshold", t, f"must be an int in [2, {holders}]")
        check_threshold(t, holders)
    except ConfigError as exc:
        raise ProtocolAbort(f"refusing to take part in round {params.round_index}: {exc}") from exc


class SecAggClient:
    """One client's protocol state for one round.

    Args:
        client_id: this client's id (must be in ``params.client_ids``).
        params: the round's public parameters.
        identity: this client's long-term Ed25519 key; required exactly when ``params.authenticated``,
            and its public half must be the one registered in ``params.identities``.

    Each step method takes the server's last message (bytes) and returns this client's next message
    (bytes). A malformed or unauthenticated server message raises :class:`MessageError`; a request that
    would be unsafe to answer raises :class:`ProtocolAbort`; a call out of order raises
    :class:`ProtocolError`. After any error the client is done for the round.

    Raises:
        ProtocolAbort: the round's parameters are unsafe: a threshold at or below half the share holders
            (a server that lies about dropouts could then unmask a client), or a graph that does not
            follow from its public seed. The server is the adversary, and it may hand out parameters of
            its own, so the client checks them itself rather than trusting whoever built them.
    """

    require_every_client = False
    """Client-level DP: every invited client's noise share is planned for the whole round, so the sum of
    a subset carries less noise than charged; such a client signs and unmasks only for a survivor set
    holding every invited client (a server that drops some gets nothing). Set per client; a restored
    client (:func:`~privfl.protocols.secagg.state.restore_client`) starts from this default."""

    def __init__(self, client_id: str, params: RoundParams, identity: IdentityKey | None = None) -> None:
        if client_id not in params.index:
            raise ProtocolError(f"client {client_id!r} is not in the round")
        if params.authenticated != (identity is not None):
            raise ProtocolError("an identity key is needed exactly when the round is authenticated")
        if identity is not None and params.identity_key(client_id) != identity.public:
            raise ProtocolError(f"client {client_id!r}: identity key differs from the registered one")
        _check_params(params, client_id)
        self._identity = identity
        self.client_id = client_id
        self.params = params
        self._c = KeyPair.generate()
        self._s = KeyPair.generate()
        self._channel = hkdf(agree(self._c.private, params.server_public_key), b"channel-secret", params.round_index, client_id)
        self._step = m.ADVERTISE
        self._peer_keys: dict[str, tuple[bytes, bytes]] = {}
        self._self_seed = b""
        self._own_shares: tuple[int, int] = (0, 0)
        self._held: dict[str, tuple[int, int]] = {}
        self._signed_survivors = b""  # the survivor bitmap signed in the consistency check

    def __repr__(self) -> str:
        return f"SecAggClient(client_id={self.client_id!r}, round_index={self.params.round_index}, step={self._step})"

    # -- helpers -------------------------------------------------------------------------------
    def _expect(self, step: int) -> None:
        if self._step != step:
            raise ProtocolError(f"client {self.client_id!r}: step {m.STEP_NAMES[step]} called out of order")
        self._step = -1  # any failure below leaves the client finished

    def _key(self, kind: int, direction: bytes) -> bytes:
        return m.channel_key(self._channel, self.params.round_index, self.client_id, kind, direction)

    def _send(self, kind: int, parts: list[bytes]) -> bytes:
        return m.seal_message(self._key(kind, m.UP), kind, self.params.round_index, self.client_id, parts)

    def _receive(self, payload: bytes, kind: int, max_bytes: int) -> Frame:
        frame, _, _ = m.open_message(
            payload,
            kind=kind,
            round_index=self.params.round_index,
            sender=SERVER,
            max_bytes=max_bytes,
            key=self._key(kind, m.DOWN),
        )
        return frame

    def _holders(self) -> frozenset[str]:
        """This client's share holders: its neighbours and itself."""
        return self.params.graph[self.client_id] | {self.client_id}

    def _read_survivors(self, raw: bytes) -> bytes:
        """The survivor bitmap of a request, checked for form (n bits, none beyond the roster)."""
        return m.unpack_members(raw, len(self.params.client_ids), sender=SERVER)

    def _survives(self, survivors: bytes, client: str) -> bool:
        """Whether ``client`` (any id, known or not) is in the survivor bitmap: O(1)."""
        position = self.params.ring.get(client)
        return position is not None and m.is_member(survivors, position)

    def _check_survivors(self, survivors: bytes) -> None:
        """Checks U3 before anything is signed or revealed: it holds us, has t members, is connected.

        Connectivity stays a check of the whole set, although a client could instead check only that
        no k/2 consecutive clients next to it on the cycle are missing (which, asked of every survivor,
        also implies a connected U3). The local form leaves each gap to the one or two survivors beside
        it: a server that colludes with those clients gets past it, and their shares (with the shares
        of the rest of each half) rebuild the self masks of each half, so the sum of every half leaks.
        With the global check every honest survivor refuses such a set. What makes the global check
        cheap is the encoding: U3 is n bits over the cycle, and on the cycle connectivity is a question
        about runs of zeros (:func:`graph.ring_connected`): O(n / 64) words, no graph search. Only odd k
        below n - 1 (never chosen by ``choose_graph``) falls back to a search of the survivors' graph.
        """
        p = self.params
        if not self._survives(survivors, self.client_id):
            raise MessageError("survivor set omits us", sender=SERVER)
        n = len(p.client_ids)
        members = int.from_bytes(survivors, "little")
        count = members.bit_count()
        if self.require_every_client and count < n:
            raise ProtocolAbort(
                f"{n - count} of {n} invited clients are missing from the survivor set: under client-level DP a "
                "subset's sum carries less noise than planned, so this client does not unmask it",
                survivors=count, threshold=n,
            )
        if count < p.threshold:
            raise ProtocolAbort(f"{count} survivors < threshold {p.threshold}", survivors=count, threshold=p.threshold)
        k = len(p.graph[self.client_id])
        if k == n - 1 or k % 2 == 0:
            connected = ring_connected(members, n, k, p.ring[self.client_id])
        else:
            at = {position: u for u, position in p.ring.items()}
            connected = components(p.graph, [at[i] for i in m.member_positions(survivors, n)]) == 1
        if not connected:
            raise ProtocolAbort("survivors' masking graph is disconnected")

    # -- round 0 -------------------------------------------------------------------------------
    def advertise(self) -> bytes:
        """Round 0: the two public keys (and, authenticated, their signature by our identity key)."""
        self._expect(m.ADVERTISE)
        parts = [self._c.public, self._s.public]
        if self._identity is not None:
            parts.append(self._identity.sign(keys_statement(self.params, self.client_id, *parts)))
        self._step = m.KEYS
        return self._send(m.ADVERTISE, parts)

    # -- round 1 -------------------------------------------------------------------------------
    def share_keys(self, keys_message: bytes) -> bytes:
        """Round 1: reads the neighbours' keys; returns the sealed shares of s_sk and b, one per neighbour.

        Raises:
            MessageError: malformed/unauthenticated message, or keys of a non-neighbour.
            ProtocolAbort: fewer than ``threshold`` share holders are alive; or, authenticated, some
                neighbour's keys are not signed by its registered identity (the server or the network
                substituted them), in which case nothing is shared.
        """
        self._expect(m.KEYS)
        p = self.params
        neighbours = p.graph[self.client_id]
        stride = 4 if p.authenticated else 3
        frame = self._receive(keys_message, m.KEYS, max_bytes=4096 + len(neighbours) * (3 * KEY_BYTES + SIGNATURE_BYTES + 300))
        if len(frame.parts) % stride:
            raise MessageError("keys message has a partial entry", sender=SERVER)
        keys: dict[str, tuple[bytes, bytes]] = {}
        for i in range(0, len(frame.parts), stride):
            peer = frame.parts[i].decode("utf-8", errors="replace")
            c_pk, s_pk = frame.parts[i + 1], frame.parts[i + 2]
            if peer not in neighbours or peer in keys:
                raise MessageError(f"keys for unexpected or repeated client {peer!r}", sender=SERVER)
            if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
                raise MessageError("public key of wrong length", sender=SERVER)
            if c_pk == s_pk:
                # Bonawitz et al.: a client's two keys must differ.
                raise MessageError(f"client {peer!r} advertised equal keys", sender=SERVER)
            if p.authenticated:
                # Bonawitz et al. abort here: an honest server checked this signature on receipt, so a bad
                # one means the keys were substituted on the way. Aborting before sharing reveals nothing.
                try:
                    verify_signature(p.identity_key(peer), frame.parts[i + 3], keys_statement(p, peer, c_pk, s_pk), signer=peer)
                except MessageError as exc:
                    raise ProtocolAbort(f"keys of {peer!r} are not signed by its registered identity: {exc.reason}") from exc
            keys[peer] = (c_pk, s_pk)
        if self.require_every_client and len(keys) != len(neighbours):
            # A server leaving some neighbours out could unmask the sum of a smaller closed group.
            raise ProtocolAbort(f"keys of {len(neighbours) - len(keys)} of {len(neighbours)} neighbours are missing; every invited client must take part")
        if len(keys) + 1 < p.threshold:
            raise ProtocolAbort(
                f"{len(keys) + 1} share holders < threshold {p.threshold}", survivors=len(keys) + 1, threshold=p.threshold
            )
        try:
            # The holders actually used are never more than the graph's, so this follows from the
            # parameter check; it is repeated where the secrets are split because this is what matters.
            check_threshold(p.threshold, len(keys) + 1)
        except ConfigError as exc:
            raise ProtocolAbort(f"refusing to share: {exc}") from exc
        self._peer_keys = keys
        self._self_seed = secrets.token_bytes(32)
        holders = [p.index[v] for v in keys] + [p.index[self.client_id]]
        s_shares = shamir.split(shamir.secret_to_int(self._s.private_bytes()), p.threshold, holders)
        b_shares = shamir.split(shamir.secret_to_int(self._self_seed), p.threshold, holders)
        me = p.index[self.client_id]
        self._own_shares = (s_shares[me], b_shares[me])
        parts: list[bytes] = []
        for peer, (c_pk, _) in sorted(keys.items()):
            x = p.index[peer]
            plaintext = s_shares[x].to_bytes(shamir.SHARE_BYTES, "big") + b_shares[x].to_bytes(shamir.SHARE_BYTES, "big")
            key = share_key(agree(self._c.private, c_pk, sender=peer), p.round_index, self.client_id, peer)
            parts.append(peer.encode("utf-8"))
            parts.append(seal(key, plaintext, share_associated_data(p.round_index, self.client_id, peer)))
        self._step = m.RELAY
        return self._send(m.SHARES, parts)

    # -- round 2 -------------------------------------------------------------------------------
    def masked_input(self, relay_message: bytes, encoded: np.ndarray) -> bytes:
        """Round 2: reads the shares addressed to us; returns y = x + PRG(b) + sum of signed pairwise masks.

        Args:
            relay_message: the server's relay of the neighbours' sealed shares.
            encoded: this client's quantized input, ``uint32`` words in [0, 2^k) of length ``dimension``.

        Raises:
            MessageError: malformed/unauthenticated relay or a share that fails to open.
            ProtocolAbort: fewer than ``threshold`` share holders remain.
        """
        self._expect(m.RELAY)
        p = self.params
        encoded = np.asarray(encoded)
        if encoded.dtype != WORD or encoded.shape != (p.dimension,):
            raise ProtocolError(f"input must be {p.dimension} uint32 words")
        frame = self._receive(relay_message, m.RELAY, max_bytes=4096 + len(self._peer_keys) * (SEALED_SHARE_BYTES + 300))
        if len(frame.parts) % 2:
            raise MessageError("relay message has a partial entry", sender=SERVER)
        held: dict[str, tuple[int, int]] = {}
        for i in range(0, len(frame.parts), 2):
            peer = frame.parts[i].decode("utf-8", errors="replace")
            if peer not in self._peer_keys or peer in held:
                raise MessageError(f"share from unexpected or repeated client {peer!r}", sender=SERVER)
            c_pk = self._peer_keys[peer][0]
            key = share_key(agree(self._c.private, c_pk, sender=peer), p.round_index, peer, self.client_id)
            plaintext = open_sealed(key, frame.parts[i + 1], share_associated_data(p.round_index, peer, self.client_id), sender=peer)
            if len(plaintext) != 2 * shamir.SHARE_BYTES:
                raise MessageError("share of wrong length", sender=peer)
            s_share = int.from_bytes(plaintext[: shamir.SHARE_BYTES], "big")
            b_share = int.from_bytes(plaintext[shamir.SHARE_BYTES :], "big")
            if s_share >= shamir.PRIME or b_share >= shamir.PRIME:
                raise MessageError("share outside the field", sender=peer)
            held[peer] = (s_share, b_share)
        if self.require_every_client and len(held) != len(self._peer_keys):
            raise ProtocolAbort(f"shares of {len(self._peer_keys) - len(held)} neighbours are missing; every invited client must take part")
        if len(held) + 1 < p.threshold:
            raise ProtocolAbort(
                f"{len(held) + 1} share holders < threshold {p.threshold}", survivors=len(held) + 1, threshold=p.threshold
            )
        self._held = held
        streams = [(self_mask_key(self._self_seed, p.round_index, self.client_id), 1)]
        for peer in held:
            shared = agree(self._s.private, self._peer_keys[peer][1], sender=peer)
            streams.append((pairwise_mask_key(shared, p.round_index, self.client_id, peer, p.mask_context), p.sign(self.client_id, peer)))

        def fill(masked: np.ndarray) -> None:
            masked[:] = encoded
            apply_masks(masked, streams)
            if p.bits < 32:
                np.bitwise_and(masked, np.uint32(p.modulus_mask), out=masked)

        message = m.seal_vector(
            self._key(m.MASKED_INPUT, m.UP), m.MASKED_INPUT, p.round_index, self.client_id, length=p.dimension, fill=fill
        )
        self._step = m.CHECK_REQUEST if p.authenticated else m.UNMASK_REQUEST
        return message

    # -- consistency check (authenticated mode) -------------------------------------------------
    def sign_survivors(self, request: bytes) -> bytes:
        """Signs the survivor set U3 the server announces (authenticated mode, between rounds 2 and 3).

        Raises:
            MessageError: malformed/unauthenticated request, or a survivor bitmap that is malformed or omits us.
            ProtocolAbort: fewer than ``threshold`` survivors, or a disconnected survivor graph.
        """
        self._expect(m.CHECK_REQUEST)
        frame = self._receive(request, m.CHECK_REQUEST, max_bytes=4096 + len(self.params.client_ids) // 8)
        if len(frame.parts) != 1:
            raise MessageError("consistency request must have 1 part", sender=SERVER)
        survivors = self._read_survivors(frame.parts[0])
        self._check_survivors(survivors)
        self._signed_survivors = survivors
        if self._identity is None:  # unreachable: CHECK_REQUEST is a step of authenticated rounds only
            raise ProtocolError(f"client {self.client_id!r}: signing the survivors needs an identity key")
        signature = self._identity.sign(survivors_statement(self.params, survivors))
        self._step = m.UNMASK_REQUEST
        return self._send(m.CHECK, [signature])

    def _check_consistency(self, survivors: bytes, signers_part: bytes, signatures: bytes) -> None:
        p = self.params
        if survivors != self._signed_survivors:
            raise ProtocolAbort("unmask request names a survivor set other than the one we signed")
        signers = m.unpack_ids(signers_part, sender=SERVER)
        if len(signatures) != SIGNATURE_BYTES * len(signers):
            raise MessageError("consistency signatures of wrong length", sender=SERVER)
        if not all(self._survives(survivors, v) for v in signers):
            raise ProtocolAbort("consistency signature from a client outside the survivor set")
        holders = self._holders()
        if not holders.issuperset(signers):
            # Only our holders' signatures count; an honest server forwards no others, and refusing
            # them keeps this step at most k + 1 signature checks whatever the server sends.
            raise ProtocolAbort("consistency signature from a client that holds none of our shares")
        statement = survivors_statement(p, survivors)
        for i, signer in enumerate(signers):
            try:
                verify_signature(p.identity_key(signer), signatures[i * SIGNATURE_BYTES : (i + 1) * SIGNATURE_BYTES], statement, signer=signer)
            except MessageError as exc:
                # Someone signed another set (the server showed clients different views), or a forgery.
                raise ProtocolAbort(f"consistency check failed: {exc.reason}") from exc
        valid = len(signers)  # distinct (unpack_ids refuses repeats), all holders, all verified
        if valid < p.threshold:
            raise ProtocolAbort(
                f"consistency check: {valid} valid signatures on the survivor set < threshold {p.threshold}",
                survivors=valid,
                threshold=p.threshold,
            )

    # -- round 3 -------------------------------------------------------------------------------
    def unmask(self, request: bytes) -> bytes:
        """Round 3: reveals b-shares of the named survivors and s-shares of the named dropped clients.

        In authenticated mode the request also carries the consistency signatures (signer ids, then their
        signatures concatenated), checked before anything else is looked at.

        Raises:
            MessageError: malformed/unauthenticated request, or one naming clients we hold no share of.
            ProtocolAbort: the request is unsafe: both shares asked for one client, our own s-key asked for,
                too few survivors, or survivors whose masking graph is disconnected (the sum of a small
                component could single out one input); authenticated, also a survivor set other than the
                one we signed, any invalid signature, or fewer than ``threshold`` valid ones from our
                share holders.
        """
        self._expect(m.UNMASK_REQUEST)
        p = self.params
        parts_expected = 5 if p.authenticated else 3
        # The bitmap, then at most k + 1 ids in the two share lists and (authenticated) k + 1 signers.
        per_holder = 2 * 300 + (300 + SIGNATURE_BYTES if p.authenticated else 0)
        frame = self._receive(request, m.UNMASK_REQUEST, max_bytes=4096 + len(p.client_ids) // 8 + len(self._holders()) * per_holder)
        if len(frame.parts) != parts_expected:
            raise MessageError(f"unmask request must have {parts_expected} parts", sender=SERVER)
        survivors = self._read_survivors(frame.parts[0])
        if p.authenticated:
            self._check_consistency(survivors, frame.parts[3], frame.parts[4])
        want_b = set(m.unpack_ids(frame.parts[1], sender=SERVER))
        want_s = set(m.unpack_ids(frame.parts[2], sender=SERVER))
        both = want_b & want_s
        if both:
            raise ProtocolAbort(f"refusing to reveal both shares of {sorted(both)!r}")
        if self.client_id in want_s:
            raise ProtocolAbort("refusing to reveal a share of our own mask key while alive")
        if not self._survives(survivors, self.client_id):
            raise MessageError("survivor set omits us", sender=SERVER)
        if not all(self._survives(survivors, v) for v in want_b) or any(self._survives(survivors, v) for v in want_s):
            raise ProtocolAbort("request inconsistent with the survivor list")
        self._check_survivors(survivors)
        known = set(self._held) | {self.client_id}
        if not want_b <= known or not want_s <= set(self._held):
            raise MessageError("request names clients whose shares we do not hold", sender=SERVER)
        held = dict(self._held)
        held[self.client_id] = self._own_shares
        parts: list[bytes] = []
        for owner in sorted(want_b):
            parts += [b"b", owner.encode("utf-8"), held[owner][1].to_bytes(shamir.SHARE_BYTES, "big")]
        for owner in sorted(want_s):
            parts += [b"s", owner.encode("utf-8"), held[owner][0].to_bytes(shamir.SHARE_BYTES, "big")]
        self._step = -1  # one answer per round, ever
        return self._send(m.UNMASK, parts)
