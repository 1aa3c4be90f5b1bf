"""A validating parser and writer for TenSEAL's serialized CKKS vectors: no peer's bytes reach SEAL unchecked.

Why: TenSEAL deserializes a ``CKKSVectorProto`` and trusts its fields. A ``sizes`` entry with no
ciphertext makes an addition index an empty list (SIGSEGV); a ciphertext without a ``sizes`` entry
crashes decryption; ``sizes = [N/2 + X]`` makes ``decrypt`` copy X doubles of heap memory past the
decoded slots. So privfl never hands TenSEAL a peer's bytes. This module parses the two layers itself:

* the protobuf (``tenseal/proto/tensors.proto``)::

      message CKKSVectorProto {
          repeated uint32 sizes = 1;        // packed: tag 0x0A, length, varints
          repeated bytes ciphertexts = 2;   // tag 0x12, length, SEAL bytes
          double scale = 3;                 // tag 0x19, 8 bytes little-endian
      }

  Only the canonical encoding TenSEAL writes for one chunk is accepted: field 1 packed with exactly
  one minimal varint, then exactly one field 2, then field 3, nothing else.
* SEAL's ``Ciphertext`` serialization: a 16-byte header (magic 0xA15E, header size 16, version
  major/minor, compression mode, reserved 0, total size) and a body, raw or compressed (zstd, or
  zlib in SEAL builds without zstd), holding
  ``parms_id`` (4 x u64), ``is_ntt_form`` (u8), ``size``, ``poly_modulus_degree``,
  ``coeff_modulus_size`` (u64 each), ``scale`` (f64), ``correction_factor`` (u64), then the
  coefficients as a nested ``DynArray`` (its own 16-byte header, a u64 count, count x u64).

Every field is checked against the public context and the config (not against another peer's
message): exactly one ciphertext per chunk, its slot count equal to the chunk's, two polynomials (a
fresh or summed ciphertext), the context's first ``parms_id``, degree N, one RNS limb, NTT form,
the configured scale bit for bit, every coefficient below q0, and every byte length. The output is a
``(2, N)`` array of coefficients; homomorphic addition is then coefficient-wise addition mod q0
(exactly what SEAL's ``add`` does for one RNS limb), and the only bytes TenSEAL ever loads are the
canonical, uncompressed ones :func:`encode_vector` builds from checked arrays.

A zstd body is inflated by libzstd in one bounded call (output capacity = the exact expected size,
declared frame content size checked first), a zlib body by Python's zlib with the same output
bound, so a decompression bomb cannot allocate more than one ciphertext's worth of memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from privfl.errors import MessageError

__all__ = [
    "COMPR_NONE",
    "COMPR_ZLIB",
    "COMPR_ZSTD",
    "CiphertextLayout",
    "RawCiphertext",
    "add_ciphertexts",
    "encode_ciphertext",
    "encode_proto",
    "encode_vector",
    "parse_vector",
]

_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr_mode, reserved, size
_PARMS = struct.Struct("<4QB")  # parms_id, is_ntt_form
_META = struct.Struct("<QQQdQ")  # size, poly_modulus_degree, coeff_modulus_size, scale, correction_factor
_COUNT = struct.Struct("<Q")
_SCALE = struct.Struct("<d")
COMPR_NONE = 0
COMPR_ZLIB = 1
COMPR_ZSTD = 2
_ZSTD_CONTENTSIZE_ERROR = 2**64 - 2
_ZSTD_CONTENTSIZE_UNKNOWN = 2**64 - 1


def _parms_id(words: Iterable[int]) -> tuple[int, int, int, int]:
    """SEAL's parms_id: four u64 words."""
    a, b, c, d = words
    return (a, b, c, d)


@dataclass(frozen=True, slots=True)
class CiphertextLayout:
    """What every acceptable ciphertext looks like, derived from the public context and the config.

    Attributes:
        parms_id: the context's first ``parms_id`` (the only level an addition-only protocol uses).
        poly_modulus_degree: N.
        modulus: the data prime q0 (one RNS limb).
        scale: the encoding scale 2^scale_bits; a ciphertext must carry exactly this value.
        seal_version: SEAL's serialization version (major, minor) written by this TenSEAL build.
    """

    parms_id: tuple[int, int, int, int]
    poly_modulus_degree: int
    modulus: int
    scale: float
    seal_version: tuple[int, int]

    @property
    def slots(self) -> int:
        """Values one ciphertext packs."""
        return self.poly_modulus_degree // 2

    @property
    def coefficients(self) -> int:
        """u64 words in one two-polynomial, one-limb ciphertext."""
        return 2 * self.poly_modulus_degree

    @property
    def body_bytes(self) -> int:
        """Length of the uncompressed SEAL body (members and nested coefficient array)."""
        return _PARMS.size + _META.size + _SEAL_HEADER.size + _COUNT.size + 8 * self.coefficients

    @property
    def max_blob_bytes(self) -> int:
        """Upper bound on one serialized SEAL ciphertext (zstd never expands by more than a few bytes per block)."""
        return _SEAL_HEADER.size + self.body_bytes + 4096

    @property
    def max_vector_bytes(self) -> int:
        """Upper bound on one serialized CKKS vector (proto overhead included)."""
        return self.max_blob_bytes + 32

    @classmethod
    def from_context(cls, context: Any, scale_bits: int) -> CiphertextLayout:
        """Reads the layout from a TenSEAL context (public or secret) and the configured scale.

        The SEAL version is read from a ciphertext this process encrypts itself, so it is the one
        this TenSEAL build writes; nothing here comes from a peer.
        """
        import tenseal as ts
        import tenseal.sealapi  # registers seal::Modulus with pybind11

        seal = context.seal_context().data
        first = seal.first_context_data()
        moduli = [m.value() for m in first.parms().coeff_modulus()]
        if len(moduli) != 1:
            raise ValueError(f"an addition-only CKKS context has one data prime, this one has {len(moduli)}")
        probe = ts.ckks_vector(context, [0.0], scale=2.0**scale_bits).serialize()
        proto = _parse_proto(probe)
        magic, header_size, major, minor, *_ = _SEAL_HEADER.unpack_from(proto.ciphertext, 0)
        if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size:
            raise ValueError("this TenSEAL build writes an unknown SEAL serialization header")
        return cls(
            parms_id=_parms_id(int(x) for x in seal.first_parms_id()),
            poly_modulus_degree=int(first.parms().poly_modulus_degree()),
            modulus=int(moduli[0]),
            scale=2.0**scale_bits,
            seal_version=(major, minor),
        )


@dataclass(frozen=True, slots=True)
class _Proto:
    size: int
    ciphertext: bytes
    scale: float


def _varint(data: bytes, offset: int, max_bytes: int) -> tuple[int, int]:
    """Reads one minimal little-endian base-128 varint of at most ``max_bytes`` bytes."""
    value = 0
    for i in range(max_bytes):
        if offset + i >= len(data):
            raise MessageError("truncated varint in the CKKS vector")
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise MessageError("non-minimal varint in the CKKS vector")
            return value, offset + i + 1
    raise MessageError("varint too long in the CKKS vector")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _parse_proto(data: bytes) -> _Proto:
    """Parses the canonical one-chunk ``CKKSVectorProto``; anything else raises MessageError."""
    # field 1 (sizes), packed: tag 0x0A, byte length, exactly one uint32 varint
    if len(data) < 1 or data[0] != 0x0A:
        raise MessageError("CKKS vector: expected the sizes field first")
    packed_len, offset = _varint(data, 1, 5)
    end = offset + packed_len
    if packed_len < 1 or end > len(data):
        raise MessageError("CKKS vector: bad sizes field length")
    size, after = _varint(data, offset, 5)
    if after != end:
        raise MessageError("CKKS vector: the sizes field must hold exactly one chunk size")
    if size >= 2**32:
        raise MessageError("CKKS vector: chunk size does not fit uint32")
    # field 2 (ciphertexts): tag 0x12, length, bytes; exactly once
    if end >= len(data) or data[end] != 0x12:
        raise MessageError("CKKS vector: expected exactly one ciphertext after the sizes")
    blob_len, offset = _varint(data, end + 1, 10)
    if offset + blob_len > len(data):
        raise MessageError("CKKS vector: truncated ciphertext")
    blob = data[offset : offset + blob_len]
    offset += blob_len
    # field 3 (scale): tag 0x19, little-endian double; then the end of the message
    if offset + 9 != len(data) or data[offset] != 0x19:
        raise MessageError("CKKS vector: expected the scale field last and nothing after it")
    (scale,) = _SCALE.unpack_from(data, offset + 1)
    return _Proto(size=size, ciphertext=blob, scale=scale)


@lru_cache(maxsize=1)
def _libzstd() -> ctypes.CDLL:
    """libzstd through ctypes (Debian's libzstd1, a dependency of apt itself, or the zstandard wheel's)."""
    names = [ctypes.util.find_library("zstd"), "libzstd.so.1", "libzstd.dylib", "libzstd.1.dylib"]
    for name in [n for n in names if n]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
        lib.ZSTD_getFrameContentSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.ZSTD_findFrameCompressedSize.restype = ctypes.c_size_t
        lib.ZSTD_findFrameCompressedSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.ZSTD_decompress.restype = ctypes.c_size_t
        lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        return lib
    raise ImportError("CKKS message validation needs libzstd: apt-get install libzstd1 (or brew install zstd)")


def _inflate_zstd(data: bytes, expected: int) -> bytes:
    """Inflates one zstd frame that must decode to exactly ``expected`` bytes, never more."""
    lib = _libzstd()
    if len(data) < 4:
        raise MessageError("CKKS ciphertext: truncated zstd frame")
    declared = lib.ZSTD_getFrameContentSize(data, len(data))
    if declared in (_ZSTD_CONTENTSIZE_ERROR, _ZSTD_CONTENTSIZE_UNKNOWN) or declared != expected:
        raise MessageError("CKKS ciphertext: zstd frame does not declare the expected size")
    framed = lib.ZSTD_findFrameCompressedSize(data, len(data))
    if lib.ZSTD_isError(framed) or framed != len(data):
        raise MessageError("CKKS ciphertext: not exactly one zstd frame")
    out = ctypes.create_string_buffer(expected)
    # libzstd never writes past the capacity it is given: a bomb fails here instead of allocating.
    got = lib.ZSTD_decompress(out, expected, data, len(data))
    if lib.ZSTD_isError(got) or got != expected:
        raise MessageError("CKKS ciphertext: zstd body does not inflate to the expected size")
    return out.raw


def _inflate_zlib(data: bytes, expected: int) -> bytes:
    """Inflates one zlib stream (SEAL built without zstd writes these) to exactly ``expected`` bytes."""
    inflater = zlib.decompressobj()
    try:
        # At most expected + 1 bytes come out, whatever the stream claims: a bomb stops here.
        out = inflater.decompress(data, expected + 1)
    except zlib.error:
        raise MessageError("CKKS ciphertext: zlib body does not inflate") from None
    if len(out) != expected or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise MessageError("CKKS ciphertext: zlib body does not inflate to the expected size")
    return out


def _parse_ciphertext(blob: bytes, layout: CiphertextLayout) -> np.ndarray:
    if len(blob) < _SEAL_HEADER.size or len(blob) > layout.max_blob_bytes:
        raise MessageError(f"CKKS ciphertext of {len(blob)} bytes is out of bounds")
    magic, header_size, major, minor, mode, reserved, size = _SEAL_HEADER.unpack_from(blob, 0)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or reserved != 0:
        raise MessageError("CKKS ciphertext: bad SEAL header")
    if (major, minor) != layout.seal_version:
        raise MessageError(f"CKKS ciphertext: SEAL version {major}.{minor}, expected {layout.seal_version}")
    if size != len(blob):
        raise MessageError("CKKS ciphertext: SEAL header size does not match its length")
    payload = blob[_SEAL_HEADER.size :]
    if mode == COMPR_NONE:
        if len(payload) != layout.body_bytes:
            raise MessageError("CKKS ciphertext: raw body has the wrong length")
        body = payload
    elif mode == COMPR_ZSTD:
        body = _inflate_zstd(payload, layout.body_bytes)
    elif mode == COMPR_ZLIB:
        body = _inflate_zlib(payload, layout.body_bytes)
    else:
        raise MessageError(f"CKKS ciphertext: compression mode {mode} is not accepted")
    *parms_id, ntt = _PARMS.unpack_from(body, 0)
    poly_count, degree, limbs, scale, correction = _META.unpack_from(body, _PARMS.size)
    if tuple(parms_id) != layout.parms_id:
        raise MessageError("CKKS ciphertext: parms_id is not the public context's")
    if ntt != 1 or poly_count != 2 or degree != layout.poly_modulus_degree or limbs != 1 or correction != 1:
        raise MessageError(
            f"CKKS ciphertext: ntt={ntt} size={poly_count} N={degree} limbs={limbs} correction={correction}, "
            f"expected ntt=1 size=2 N={layout.poly_modulus_degree} limbs=1 correction=1"
        )
    # Bit-for-bit: a ciphertext at any other scale (or NaN) must not enter a sum.
    if _SCALE.pack(scale) != _SCALE.pack(layout.scale):
        raise MessageError(f"CKKS ciphertext: scale {scale!r}, expected {layout.scale!r}")
    offset = _PARMS.size + _META.size
    magic, header_size, major, minor, mode, reserved, size = _SEAL_HEADER.unpack_from(body, offset)
    words = layout.coefficients
    if (
        magic != _SEAL_MAGIC
        or header_size != _SEAL_HEADER.size
        or (major, minor) != layout.seal_version
        or mode != COMPR_NONE
        or reserved != 0
        or size != _SEAL_HEADER.size + _COUNT.size + 8 * words
    ):
        raise MessageError("CKKS ciphertext: bad coefficient array header")
    offset += _SEAL_HEADER.size
    (count,) = _COUNT.unpack_from(body, offset)
    if count != words:
        raise MessageError(f"CKKS ciphertext: {count} coefficients, expected {words}")
    coefficients = np.frombuffer(body, dtype="<u8", count=words, offset=offset + _COUNT.size)
    if int(coefficients.max()) >= layout.modulus:
        raise MessageError("CKKS ciphertext: a coefficient is not reduced modulo q0")
    return coefficients.reshape(2, layout.poly_modulus_degree).astype(np.uint64)


def parse_vector(data: bytes, layout: CiphertextLayout, expected_size: int) -> np.ndarray:
    """Parses and checks one serialized CKKS vector (one chunk of an update).

    Args:
        data: the bytes a peer sent for this chunk.
        layout: what the public context and config allow.
        expected_size: the number of values this chunk must hold (1..N/2).

    Returns:
        The ciphertext's coefficients, shape ``(2, N)``, dtype uint64, each below q0.

    Raises:
        MessageError: any field, length or value is not exactly what the layout allows.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("CKKS vector is not bytes")
    data = bytes(data)
    if len(data) > layout.max_vector_bytes:
        raise MessageError(f"CKKS vector of {len(data)} bytes exceeds {layout.max_vector_bytes}")
    proto = _parse_proto(data)
    if proto.size != expected_size or not 1 <= proto.size <= layout.slots:
        raise MessageError(f"CKKS vector declares {proto.size} values, expected {expected_size}")
    if _SCALE.pack(proto.scale) != _SCALE.pack(layout.scale):
        raise MessageError(f"CKKS vector: scale {proto.scale!r}, expected {layout.scale!r}")
    return _parse_ciphertext(proto.ciphertext, layout)


@dataclass(frozen=True, slots=True)
class RawCiphertext:
    """Every field of a SEAL ciphertext body, for writing one (also any hostile variant a test needs).

    Attributes mirror SEAL's ``Ciphertext`` members; ``coefficients`` is flat uint64 and
    ``array_count`` (default: its length) is the count written before it.
    """

    parms_id: tuple[int, int, int, int]
    is_ntt_form: int
    size: int
    poly_modulus_degree: int
    coeff_modulus_size: int
    scale: float
    correction_factor: int
    coefficients: np.ndarray
    seal_version: tuple[int, int]
    array_count: int | None = None

    @classmethod
    def of(cls, coefficients: np.ndarray, layout: CiphertextLayout) -> RawCiphertext:
        """The fields of a valid two-polynomial ciphertext with these coefficients."""
        return cls(
            parms_id=layout.parms_id,
            is_ntt_form=1,
            size=2,
            poly_modulus_degree=layout.poly_modulus_degree,
            coeff_modulus_size=1,
            scale=layout.scale,
            correction_factor=1,
            coefficients=np.ascontiguousarray(coefficients, dtype="<u8").reshape(-1),
            seal_version=layout.seal_version,
        )


def encode_ciphertext(raw: RawCiphertext) -> bytes:
    """SEAL's uncompressed serialization of ``raw`` (compression mode none)."""
    words = np.ascontiguousarray(raw.coefficients, dtype="<u8").reshape(-1)
    count = words.size if raw.array_count is None else raw.array_count
    major, minor = raw.seal_version
    array_bytes = _SEAL_HEADER.size + _COUNT.size + 8 * words.size
    body = b"".join(
        [
            _PARMS.pack(*raw.parms_id, raw.is_ntt_form),
            _META.pack(raw.size, raw.poly_modulus_degree, raw.coeff_modulus_size, raw.scale, raw.correction_factor),
            _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, major, minor, COMPR_NONE, 0, array_bytes),
            _COUNT.pack(count),
            words.tobytes(),
        ]
    )
    return _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, major, minor, COMPR_NONE, 0, _SEAL_HEADER.size + len(body)) + body


def encode_proto(sizes: list[int], ciphertexts: list[bytes], scale: float | None) -> bytes:
    """A ``CKKSVectorProto`` with exactly these fields (any counts, as TenSEAL would write them).

    Args:
        sizes: the ``sizes`` entries (uint32), written packed; none when empty.
        ciphertexts: the ``ciphertexts`` entries.
        scale: the ``scale`` field, or None to leave it out.
    """
    chunks = []
    if sizes:
        packed = b"".join(_encode_varint(v) for v in sizes)
        chunks += [b"\x0a", _encode_varint(len(packed)), packed]
    for blob in ciphertexts:
        chunks += [b"\x12", _encode_varint(len(blob)), bytes(blob)]
    if scale is not None:
        chunks += [b"\x19", _SCALE.pack(scale)]
    return b"".join(chunks)


def encode_vector(coefficients: np.ndarray, layout: CiphertextLayout, size: int) -> bytes:
    """The canonical, uncompressed TenSEAL serialization of a checked ciphertext.

    Args:
        coefficients: ``(2, N)`` uint64, each below q0 (as :func:`parse_vector` or
            :func:`add_ciphertexts` return).
        layout: the layout the coefficients were checked against.
        size: values the vector holds (1..N/2).

    Returns:
        Bytes ``tenseal.ckks_vector_from`` loads.
    """
    if np.shape(coefficients) != (2, layout.poly_modulus_degree) or not 1 <= size <= layout.slots:
        raise ValueError("not a (2, N) ciphertext or a size out of range")
    return encode_proto([size], [encode_ciphertext(RawCiphertext.of(coefficients, layout))], layout.scale)


def add_ciphertexts(ciphertexts: list[np.ndarray], modulus: int) -> np.ndarray:
    """Homomorphic addition of same-level, same-scale CKKS ciphertexts: coefficient-wise sum mod q0.

    For one RNS limb this is exactly SEAL's ``Evaluator::add`` (which adds the polynomials'
    coefficients modulo each prime); q0 < 2^61, so a sum of two reduced words never wraps a u64.
    """
    if not ciphertexts:
        raise ValueError("nothing to add")
    q = np.uint64(modulus)
    total: np.ndarray = ciphertexts[0].copy()
    for c in ciphertexts[1:]:
        total += c
        total[total >= q] -= q
    return total
