"""Packing many messages into one Redis string argument or reply, and reading XREAD ids."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from daskinfer.connectors.redis.scripts import BIG_MESSAGE

ENTRY_HEADER = struct.Struct(">III")
LENGTH = struct.Struct(">I")
GONE_MARKER = 0xFFFFFFFF
NEXT_MARKER = 0xFFFFFFFE
NEXT_HEADER = LENGTH.pack(NEXT_MARKER)


def pack_messages(messages: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    """Messages as ``(packed, big)``: small ones in one string (uint32 length, bytes), big ones apart."""
    pack = LENGTH.pack
    parts: list[bytes] = []
    big: list[bytes] = []
    for m in messages:
        if len(m) > BIG_MESSAGE:
            parts.append(NEXT_HEADER)
            big.append(m)
        else:
            parts += (pack(len(m)), m)
    return b"".join(parts), big


def unpack_entries(reply: list[bytes]) -> list[tuple[str, bytes | None, dict[str, bytes] | None]]:
    """``(id, data, meta)`` of each entry of a read script's reply (data None: the entry was
    deleted; meta: its fields other than ``d``, None when it has none)."""
    if not reply:
        return []
    buf, big = reply[0], iter(reply[1:])
    out: list[tuple[str, bytes | None, dict[str, bytes] | None]] = []
    i, n = 0, len(buf)
    unpack = ENTRY_HEADER.unpack_from
    while i < n:
        lid, ld, lm = unpack(buf, i)
        i += 12
        eid = buf[i : i + lid].decode()
        i += lid
        meta = None
        if lm:
            meta = _fields(buf[i : i + lm])
            i += lm
        if ld == GONE_MARKER:
            out.append((eid, None, None))
        elif ld == NEXT_MARKER:
            out.append((eid, next(big), meta))
        else:
            out.append((eid, buf[i : i + ld], meta))
            i += ld
    return out


def _fields(buf: bytes) -> dict[str, bytes]:
    """Fields packed by the read script: per field a uint32 length and the name, a uint32 length and the value."""
    out: dict[str, bytes] = {}
    i, n = 0, len(buf)
    unpack = LENGTH.unpack_from
    while i < n:
        (ln,) = unpack(buf, i)
        name = buf[i + 4 : i + 4 + ln].decode("utf-8", "replace")
        i += 4 + ln
        (lv,) = unpack(buf, i)
        out.setdefault(name, buf[i + 4 : i + 4 + lv])
        i += 4 + lv
    return out


def more_fields(fields: tuple[tuple[str, str], ...]) -> str:
    """Fields of an entry after ``d`` as the deliver script takes them (each name and value ends in a newline)."""
    return "".join(f"{name}\n{value}\n" for name, value in fields)


def unpack_messages(buf: bytes, big: list[bytes]) -> list[bytes]:
    """Messages of a fetch script's reply (see :func:`pack_messages`)."""
    out = []
    i, n = 0, len(buf)
    unpack = LENGTH.unpack_from
    it = iter(big)
    while i < n:
        (ld,) = unpack(buf, i)
        i += 4
        if ld == NEXT_MARKER:
            out.append(next(it))
        else:
            out.append(buf[i : i + ld])
            i += ld
    return out


def next_entry_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def last_xread_id(reply: Any, default: str) -> str:
    """Id of the last entry in an ``XREAD`` reply of one stream (list or, with RESP3 responses, dict)."""
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if len(entries) == 1 and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], (list, tuple)):
        entries = entries[0]  # RESP3 responses: {stream: [[entry, ...]]}
    return as_str(entries[-1][0]) if entries else default


def as_str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
