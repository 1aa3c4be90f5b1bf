"""Byte codecs for a secure-aggregation round that crosses process boundaries: public round
parameters (server to clients) and one client's private round state (kept on the client's machine).

A networked client answers each protocol step in a fresh process (Flower runs one ClientApp process
per message), so its round state must survive as bytes between steps. That state holds the round's
X25519 private keys, the self-mask seed and the Shamir shares it holds for its neighbours: it is a
secret of the client, stored only on the client's own machine (its state directory or its Flower
node state), never sent anywhere, and its codec is explicit (no pickle).
"""

from __future__ import annotations

import struct

from privfl.errors import ConfigError, MessageError
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg import shamir
from privfl.protocols.secagg.client import SecAggClient
from privfl.protocols.secagg.keys import IdentityKey, KeyPair, private_key_from_bytes
from privfl.protocols.secagg.params import RoundParams
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = ["decode_params", "encode_params", "export_client", "restore_client"]

_KIND_PARAMS = 20
_KIND_CLIENT_STATE = 21
_PARAMS = struct.Struct(">HHIB")  # threshold, neighbours (0: complete graph), dimension, bits
_SHARES = struct.Struct(f">{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")
_MAX_PARAMS_BYTES = 1 << 26


def encode_params(params: RoundParams) -> bytes:
    """The round's public parameters as the server sends them to every invited client."""
    ids = m.pack_ids(params.client_ids)
    identities = b"" if params.identities is None else b"".join(params.identities[u] for u in params.client_ids)
    header = _PARAMS.pack(params.threshold, params.neighbours or 0, params.dimension, params.bits)
    return encode_frame(
        _KIND_PARAMS, params.round_index, "server",
        [header, ids, params.graph_seed, params.server_public_key, identities, params.mask_context],
    )


def decode_params(data: bytes, *, round_index: int) -> RoundParams:
    """Parses :func:`encode_params`; the client then checks the parameters itself (``SecAggClient``).

    Raises:
        MessageError: malformed bytes, another round, or parameters out of range.
    """
    frame = decode_frame(data, kind=_KIND_PARAMS, round_index=round_index, max_bytes=_MAX_PARAMS_BYTES)
    if len(frame.parts) != 6 or len(frame.parts[0]) != _PARAMS.size:
        raise MessageError("round parameters have the wrong shape", sender="server")
    threshold, neighbours, dimension, bits = _PARAMS.unpack(frame.parts[0])
    ids = m.unpack_ids(frame.parts[1], sender="server")
    identities_raw = frame.parts[4]
    identities = None
    if identities_raw:
        if len(identities_raw) != 32 * len(ids):
            raise MessageError("identity registry has the wrong length", sender="server")
        ordered = sorted(ids)
        identities = {u: identities_raw[32 * i : 32 * (i + 1)] for i, u in enumerate(ordered)}
    try:
        return RoundParams(
            round_index=round_index,
            client_ids=tuple(ids),
            threshold=threshold,
            neighbours=neighbours or None,
            graph_seed=frame.parts[2],
            dimension=dimension,
            bits=bits,
            server_public_key=frame.parts[3],
            identities=identities,
            mask_context=frame.parts[5],
        )
    except ConfigError as exc:
        raise MessageError(f"round parameters rejected: {exc}", sender="server") from exc


def _private(pair: KeyPair) -> bytes:
    return pair.private_bytes()


def _pair(raw: bytes) -> KeyPair:
    private = private_key_from_bytes(raw)
    return KeyPair(private=private, public=private.public_key().public_bytes_raw())


def export_client(client: SecAggClient) -> bytes:
    """A client's private round state (secret: keep it on the client's machine only)."""
    peer_ids = sorted(client._peer_keys)
    held_ids = sorted(client._held)
    parts = [
        encode_params(client.params),
        struct.pack(">i", client._step),
        _private(client._c),
        _private(client._s),
        client._self_seed,
        _SHARES.pack(*(v.to_bytes(shamir.SHARE_BYTES, "big") for v in client._own_shares)),
        m.pack_ids(peer_ids),
        b"".join(client._peer_keys[u][0] + client._peer_keys[u][1] for u in peer_ids),
        m.pack_ids(held_ids),
        b"".join(_SHARES.pack(*(v.to_bytes(shamir.SHARE_BYTES, "big") for v in client._held[u])) for u in held_ids),
        client._signed_survivors,  # the survivor bitmap signed in the consistency check (b"" before it)
    ]
    return encode_frame(_KIND_CLIENT_STATE, client.params.round_index, client.client_id, parts)


def restore_client(data: bytes, *, round_index: int, client_id: str, identity: IdentityKey | None = None) -> SecAggClient:
    """Rebuilds a client from :func:`export_client`'s bytes for the next step.

    Raises:
        MessageError: the state is malformed or belongs to another round or client.
    """
    frame = decode_frame(data, kind=_KIND_CLIENT_STATE, round_index=round_index, sender=client_id, max_bytes=_MAX_PARAMS_BYTES * 2)
    if len(frame.parts) != 11:
        raise MessageError("secure-aggregation client state has the wrong shape", sender=client_id)
    (params_raw, step_raw, c_raw, s_raw, seed, own, peers_raw, peer_keys_raw, held_raw, held_shares_raw, signed_raw) = frame.parts
    params = decode_params(params_raw, round_index=round_index)
    client = SecAggClient.__new__(SecAggClient)
    client._identity = identity
    client.client_id = client_id
    client.params = params
    client._c = _pair(c_raw)
    client._s = _pair(s_raw)
    from privfl.protocols.secagg.keys import agree, hkdf

    client._channel = hkdf(agree(client._c.private, params.server_public_key), b"channel-secret", params.round_index, client_id)
    (client._step,) = struct.unpack(">i", step_raw)
    peers = m.unpack_ids(peers_raw, sender=client_id)
    if len(peer_keys_raw) != 64 * len(peers):
        raise MessageError("client state: peer keys of the wrong length", sender=client_id)
    client._peer_keys = {u: (peer_keys_raw[64 * i : 64 * i + 32], peer_keys_raw[64 * i + 32 : 64 * i + 64]) for i, u in enumerate(peers)}
    client._self_seed = seed
    a, b = _SHARES.unpack(own)
    client._own_shares = (int.from_bytes(a, "big"), int.from_bytes(b, "big"))
    held = m.unpack_ids(held_raw, sender=client_id)
    if len(held_shares_raw) != _SHARES.size * len(held):
        raise MessageError("client state: held shares of the wrong length", sender=client_id)
    client._held = {}
    for i, u in enumerate(held):
        a, b = _SHARES.unpack(held_shares_raw[_SHARES.size * i : _SHARES.size * (i + 1)])
        client._held[u] = (int.from_bytes(a, "big"), int.from_bytes(b, "big"))
    client._signed_survivors = m.unpack_members(signed_raw, len(params.client_ids), sender=client_id) if signed_raw else b""
    return client
