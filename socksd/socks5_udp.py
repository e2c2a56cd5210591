"""Sans-IO SOCKS5 UDP request header (RFC 1928 section 7).

Owns: parsing the header a client puts in front of every datagram it relays through a
UDP association, and encoding the header in front of every datagram sent back.
Must not: do I/O or decide policy (which sources are accepted, where datagrams may go).

    +-----+------+------+----------+----------+----------+
    | RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
    |  2  |  1   |  1   | Variable |    2     | Variable |
    +-----+------+------+----------+----------+----------+
"""

from __future__ import annotations

from dataclasses import dataclass

from socksd.codec import AddressType, ProtocolError
from socksd.socks5 import decode_address, encode_address


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One client datagram: where it goes and what it carries.

    Attributes:
        frag: FRAG; 0 for a standalone datagram (fragments are not supported and
            should be dropped by the caller).
        address_type: ATYP as sent.
        host: Dotted IPv4, compressed IPv6, or the domain name as sent.
        port: DST.PORT.
        data: the payload (a memoryview slice of the input: no copy).
    """

    frag: int
    address_type: AddressType
    host: str
    port: int
    data: memoryview


_ATYP = {int(a): a for a in AddressType}


def parse_udp_datagram(datagram: bytes | bytearray | memoryview) -> UdpDatagram:
    """Parse a client datagram.

    Raises:
        ProtocolError: truncated header, non-zero RSV, unknown ATYP or a bad
            domain name (reason names which); the caller drops the datagram
            (see `socksd.codec` for what the error means).
    """
    view = memoryview(datagram)
    size = len(view)
    if size < 4:
        raise ProtocolError("udp_truncated")
    if view[0] or view[1]:
        raise ProtocolError("udp_bad_rsv")
    atyp = _ATYP.get(view[3])
    if atyp is None:
        raise ProtocolError("udp_bad_address_type")
    if atyp is AddressType.IPV4:
        start, end = 4, 8
    elif atyp is AddressType.IPV6:
        start, end = 4, 20
    else:
        if size < 5:
            raise ProtocolError("udp_truncated")
        start, end = 5, 5 + view[4]
    if size < end + 2:
        raise ProtocolError("udp_truncated")
    host = decode_address(atyp, bytes(view[start:end]))
    if host is None:
        raise ProtocolError("udp_bad_domain_name")
    port = (view[end] << 8) | view[end + 1]
    return UdpDatagram(view[2], atyp, host, port, view[end + 2 :])


def encode_udp_header(host: str, port: int) -> bytes:
    """The header for a datagram from `host`:`port` (an IP address) to the client."""
    return b"\x00\x00\x00" + encode_address(host) + port.to_bytes(2, "big")
