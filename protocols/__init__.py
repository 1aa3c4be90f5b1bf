"""Update protection: plaintext (baseline), CKKS homomorphic encryption, and secure aggregation."""

from privfl.protocols.base import ClientUpdate, DirectTransport, Protection, RoundResult, Transport

__all__ = ["ClientUpdate", "DirectTransport", "Protection", "RoundResult", "Transport"]
