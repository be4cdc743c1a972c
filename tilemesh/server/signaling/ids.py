"""Identifier types: a room id and a peer id are both strings on the wire, but never interchangeable in code.

`RoomId` is the capability to join a room (anyone holding the QR code's URL may enter), so it carries 128 bits
from `secrets`. `PeerId` is public to everyone in the room (the roster lists it); what proves a reconnecting
socket is the same peer is the separate `ResumeToken`, known only to that peer.

The types subclass `str` so they serialize to JSON as-is, while a type checker (and `repr`) keeps them apart.
"""

from __future__ import annotations

import re
import secrets

# The URL-safe base64 alphabet: ids appear in URLs and HTML attributes, where nothing else needs escaping.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")


class _Id(str):
    __slots__ = ()
    min_len = 1
    max_len = 64

    @classmethod
    def parse(cls, value: object):
        """The id from untrusted input, or ValueError saying why not."""
        if not isinstance(value, str):
            raise ValueError(f"{cls.__name__} must be a string")
        if not cls.min_len <= len(value) <= cls.max_len or not _TOKEN_CHARS.fullmatch(value):
            raise ValueError(f"malformed {cls.__name__}")
        return cls(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str.__repr__(self)})"


class RoomId(_Id):
    __slots__ = ()
    # token_urlsafe(16) is 22 characters; shorter strings cannot be ids we issued, so reject them early.
    min_len = 22

    @classmethod
    def new(cls) -> RoomId:
        return cls(secrets.token_urlsafe(16))


class PeerId(_Id):
    __slots__ = ()
    min_len = 4

    @classmethod
    def new(cls) -> PeerId:
        # 64 bits: unique across the server's few thousand peers; secrecy is the resume token's job.
        return cls("p" + secrets.token_urlsafe(8))


class ResumeToken(_Id):
    __slots__ = ()
    min_len = 22

    @classmethod
    def new(cls) -> ResumeToken:
        return cls(secrets.token_urlsafe(16))
