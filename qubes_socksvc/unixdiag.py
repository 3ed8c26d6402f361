# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The kernel's own list of listening Unix sockets, over sock_diag netlink.

``/proc/net/unix`` prints a socket's path byte by byte with no quoting
(net/unix/af_unix.c: unix_seq_show, ``seq_putc``), so a socket bound at a path
holding a newline can add a line of its own, claiming any path listens.  The
sock_diag answer carries each name as a netlink attribute with its length
(net/unix/diag.c: sk_diag_dump_name): exact bytes, nothing to parse.

Asking never connects to a socket, so it activates nothing.  Only ``socket``
and ``struct``: ``list`` imports this.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

#: include/uapi/linux/netlink.h
NETLINK_SOCK_DIAG = 4
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
#: struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq; __u32 nlmsg_pid; }
_NLMSGHDR = struct.Struct("=IHHII")
#: struct nlattr { __u16 nla_len; __u16 nla_type; }, padded to NLA_ALIGNTO = 4
_NLATTR = struct.Struct("=HH")

#: include/uapi/linux/sock_diag.h
SOCK_DIAG_BY_FAMILY = 20

#: include/uapi/linux/unix_diag.h: struct unix_diag_req { __u8 sdiag_family; __u8 sdiag_protocol;
#: __u16 pad; __u32 udiag_states; __u32 udiag_ino; __u32 udiag_show; __u32 udiag_cookie[2]; }
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
#: struct unix_diag_msg { __u8 udiag_family; __u8 udiag_type; __u8 udiag_state; __u8 pad;
#: __u32 udiag_ino; __u32 udiag_cookie[2]; }
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
#: struct unix_diag_vfs { __u32 udiag_vfs_ino; __u32 udiag_vfs_dev; }
_UNIX_DIAG_VFS = struct.Struct("=II")
UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_VFS = 0x02
UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
#: INET_DIAG_NOCOOKIE: match any socket.
_NO_COOKIE = 0xFFFFFFFF

#: include/net/tcp_states.h: a listening Unix socket's sk_state (net/unix/af_unix.c: unix_listen).
TCP_LISTEN = 10

#: The kernel's dump messages are at most a page or two (netlink_dump); more room costs nothing.
_RECV_SIZE = 1 << 16


class UnixDiagUnavailable(OSError):
    """The kernel does not answer sock_diag for AF_UNIX (no CONFIG_UNIX_DIAG, or no netlink)."""


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening Unix socket, as the kernel reports it."""

    name: bytes
    """``sun_path`` exactly as bound, without the NUL the kernel keeps (net/unix/af_unix.c:
    unix_mkname_bsd); relative if bound relative to the binder's cwd; ``b"\\0..."`` abstract."""
    type: int
    """``SOCK_STREAM`` or ``SOCK_SEQPACKET``."""
    vfs: tuple[int, int] | None
    """(st_dev, st_ino) of the file the socket is bound to, in ``os.stat``'s encoding, the inode
    number cut to 32 bits as the kernel sends it (``__u32 udiag_vfs_ino``); ``None`` for an
    abstract socket (net/unix/diag.c: sk_diag_dump_vfs)."""


def _stat_dev(kernel_dev: int) -> int:
    """The kernel's internal dev_t (``MAJOR << 20 | MINOR``, include/linux/kdev_t.h: MKDEV), as
    ``st_dev`` encodes it (fs/stat.c: cp_new_stat, new_encode_dev)."""
    return os.makedev(kernel_dev >> 20, kernel_dev & 0xFFFFF)


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    attributes: dict[int, bytes] = {}
    while start + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, start)
        if length < _NLATTR.size or start + length > end:
            raise UnixDiagUnavailable(f"malformed netlink attribute (length {length})")
        attributes[kind] = data[start + _NLATTR.size:start + length]
        start += (length + 3) & ~3
    return attributes


def listeners(sequence: int = 1) -> list[Listener]:
    """Every Unix socket in TCP_LISTEN in this network namespace (the same set /proc/net/unix
    lists): SOCK_DIAG_BY_FAMILY with NLM_F_DUMP, answered by net/unix/diag.c: unix_diag_dump.

    Raises UnixDiagUnavailable when the kernel cannot answer, or answers something malformed.
    """
    request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, 0, UDIAG_SHOW_NAME | UDIAG_SHOW_VFS,
                                  _NO_COOKIE, _NO_COOKIE)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                            sequence, 0)
    found: list[Listener] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(10)
            sock.sendto(header + request, (0, 0))
            while True:
                data, _, flags, sender = sock.recvmsg(_RECV_SIZE)
                if flags & socket.MSG_TRUNC:
                    raise UnixDiagUnavailable("netlink answer truncated")
                if sender[0] != 0:  # only the kernel (port 0) answers a dump
                    continue
                if _parse(data, sequence, found):
                    return found
    except UnixDiagUnavailable:
        raise
    except (OSError, AttributeError) as e:  # AttributeError: a Python without AF_NETLINK
        raise UnixDiagUnavailable(f"sock_diag for AF_UNIX: {e}") from e


def _parse(data: bytes, sequence: int, found: list[Listener]) -> bool:
    """Appends the listeners of one datagram of the dump; True at NLMSG_DONE."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise UnixDiagUnavailable(f"malformed netlink message (length {length})")
        if seq == sequence:
            body = offset + _NLMSGHDR.size
            if kind == NLMSG_DONE:
                return True
            if kind == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", data, body)
                if error == 0:  # an acknowledgement, not a failure
                    return True
                raise UnixDiagUnavailable(-error, os.strerror(-error))
            if kind == SOCK_DIAG_BY_FAMILY and body + _UNIX_DIAG_MSG.size <= offset + length:
                family, sock_type, state, _, _, _, _ = _UNIX_DIAG_MSG.unpack_from(data, body)
                attributes = _attributes(data, body + _UNIX_DIAG_MSG.size, offset + length)
                if family == socket.AF_UNIX and state == TCP_LISTEN and UNIX_DIAG_NAME in attributes:
                    name = attributes[UNIX_DIAG_NAME]
                    if not name.startswith(b"\0"):  # a path: cut at its NUL, which a path cannot hold
                        name = name.partition(b"\0")[0]
                    vfs = None
                    if len(attributes.get(UNIX_DIAG_VFS, b"")) == _UNIX_DIAG_VFS.size:
                        ino, dev = _UNIX_DIAG_VFS.unpack(attributes[UNIX_DIAG_VFS])
                        vfs = (_stat_dev(dev), ino)
                    found.append(Listener(name, sock_type, vfs))
        offset += (length + 3) & ~3
    return False
