# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""dom0's qrexec policy for what a manifest declares: ``qubes-socksvc policy``.

The lines are in qrexec's current policy format (qubes-core-qrexec 4.4,
``qrexec/policy/parser.py``: ``Rule.from_line`` splits ``SERVICE +ARGUMENT SOURCE
TARGET ACTION [PARAM=VALUE ...]`` on whitespace; ``AbstractPolicy.evaluate``: the
first line that matches a ``Request`` wins).  Nothing is allowed that the manifest
does not say: a key without ``policy:`` gets a commented-out ``deny`` line, a
``NAME`` key's rules never reach a declared ``NAME+ARG`` key (closing ``deny`` lines
in between), and a ``deny`` holds for every target form, ``@default`` included.
Imports nothing heavy; the manifest validates ``policy:`` entries with
:func:`source_problem`.
"""

from __future__ import annotations

import os.path
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

from . import qrexec
from .errors import SocksvcError
from .model import Manifest, Policy

#: The actions of a policy line (qrexec/policy/parser.py: class Action).
Verb = Literal["deny", "ask", "allow"]
VERBS: tuple[Verb, ...] = ("deny", "ask", "allow")

#: Values after ``@type:``: the parser takes any non-empty word not starting with ``@``
#: (VMToken.__new__), and TypeVM.match compares it with the qube's class name
#: (``type(vm).__name__``: AppVM, DispVM...): a Python identifier, so anything else matches
#: no caller.
_TYPE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: What a tag is made of: qubes-core-admin refuses any other tag (qubes/vm/__init__.py:
#: Tags.validate_tag), so a line naming another would match no caller.
_TAG_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
#: A qube's name (qubes-core-admin qubes/vm/__init__.py: validate_name): a letter first.  The
#: descriptor takes any source qrexec-daemon passes (qrexec.is_source); a policy line naming
#: what no qube can be called would match no caller.
_QUBE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_UUID_RE = re.compile(r"uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
#: qrexec/policy/parser.py: the prefixed Source tokens are TypeVM and TagVM.  DispVMTemplate
#: and DispVMTag parse as sources but match no caller: their ``match`` compares only an
#: ``@dispvm``/``@dispvm:X`` *target*, and a request's source is a plain qube name.
#: Refused: as a deny, they would deny nobody.
#: parser.py: is_dom0: one qube under three names.
_DOM0 = ("@adminvm", "dom0", "uuid:00000000-0000-0000-0000-000000000000")
#: First-match order among callers: a named qube before a group, a group before everyone.
_NAMED, _GROUP, _EVERYONE = 0, 1, 2


def _source_kind(token: str) -> tuple[int, str | None]:
    """(first-match rank, why the token is no Source) for one caller token."""
    if token in ("*", "@anyvm"):
        return _EVERYONE, None
    if token == "@adminvm":
        return _NAMED, None
    if token.startswith("@tag:"):
        return _GROUP, None if _TAG_RE.match(token[5:]) else "expected @tag:NAME, NAME of [A-Za-z0-9_-]"
    if token.startswith("@type:"):
        return _GROUP, None if _TYPE_RE.match(token[6:]) else "expected @type:NAME, NAME a class name (AppVM...)"
    if token.startswith("@dispvm:"):
        return _NAMED, ("matches no caller: qrexec compares @dispvm:... with a call's target only "
                        "(qrexec/policy/parser.py: DispVMTemplate.match, DispVMTag.match); name "
                        "disposables by @type:DispVM, a @tag: or their names")
    if token.startswith("@"):
        return _NAMED, ("not a caller keyword; expected a qube name, uuid:UUID, @anyvm, @adminvm, *, "
                        "@tag:TAG or @type:TYPE (@default and @dispvm name targets, not callers)")
    if token.startswith("uuid:"):
        return _NAMED, None if _UUID_RE.match(token) else "expected uuid: and a lower-case UUID"
    if len(token) <= qrexec.MAX_SOURCE_LEN and _QUBE_RE.match(token):
        return _NAMED, None
    return _NAMED, (f"expected a qube name: a letter, then [A-Za-z0-9_.-], at most {qrexec.MAX_SOURCE_LEN} "
                    "characters")


def source_problem(token: str) -> str | None:
    """Why ``token`` cannot stand in a policy line's source column, or None
    (qrexec/policy/parser.py: Source and its subclasses; VMToken.__new__)."""
    return _source_kind(token)[1]


def this_qube(name: str) -> str:
    """This qube as a policy target: a qube name, or ``@adminvm`` for dom0
    (qrexec/policy/parser.py: is_dom0 treats ``dom0`` and ``@adminvm`` alike)."""
    if name in ("dom0", "@adminvm"):
        return "@adminvm"
    if not qrexec.is_source(name):
        raise ValueError(f"invalid qube name {name!r}: expected [A-Za-z0-9_.-], at most "
                         f"{qrexec.MAX_SOURCE_LEN} characters, or dom0")
    return name


# --- the lines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    service: str
    argument: str
    source: str
    target: str
    action: Verb
    params: tuple[str, ...] = ()
    commented: bool = False

    def columns(self) -> list[str]:
        return [("#" if self.commented else "") + self.service, self.argument, self.source, self.target,
                self.action, *self.params]


def _params(policy: Policy, verb: Verb, redirect: str | None, qube: str) -> tuple[str, ...]:
    """``target=``/``default_target=``/``autostart=``/``notify=`` as each action takes them
    (qrexec/policy/parser.py: Allow, Ask and Deny's keyword arguments)."""
    params: list[str] = []
    if verb != "deny":
        if redirect is not None:
            params.append(f"target={redirect}")
        if verb == "ask":
            params.append(f"default_target={qube}")
        if policy.autostart is not None:
            params.append(f"autostart={'yes' if policy.autostart else 'no'}")
    if policy.notify is not None:
        params.append(f"notify={'yes' if policy.notify else 'no'}")
    return tuple(params)


def _rules(name: str, argument: str, policy: Policy, qube: str, routes: bool) -> Iterator[_Line]:
    """The lines of one policy entry: callers from the most specific to everyone,
    deny before ask before allow among equally specific ones.  Each line has its
    ``@default`` twin (a call that names no target matches only those: DefaultVM has no
    ``match`` of its own, and IntendedTarget.verify turns an unknown name into
    ``@default``): a grant where the entry ``routes`` @default here, every deny (kept
    only where needed, see :func:`_default_denies`)."""
    callers = sorted(((_source_kind(s)[0], VERBS.index(verb), s, verb)
                      for verb in VERBS for s in getattr(policy, verb)), key=lambda c: c[:2])
    for _, _, source, verb in callers:
        yield _Line(name, argument, source, qube, verb, _params(policy, verb, None, qube))
        if verb == "deny" or routes:
            yield _Line(name, argument, source, "@default", verb, _params(policy, verb, qube, qube))


def _closing(name: str, argument: str, general: Policy, qube: str) -> Iterator[_Line]:
    """Deny, for ``NAME+ARG``, each caller ``NAME``'s lines below would let in (each one:
    ``@anyvm`` does not cover ``@adminvm``, AnyVM.match), for both target forms."""
    for source in general.grants():
        yield _Line(name, argument, source, qube, "deny")
        yield _Line(name, argument, source, "@default", "deny")


def _may_share_a_caller(a: str, b: str) -> bool:
    """Whether one qube could match both source tokens (parser.py: VMToken.match, match_strings,
    AnyVM.match): not two different named qubes, nor ``@anyvm`` and dom0; tags, types and a
    name beside a ``uuid:`` only dom0 knows, so they may."""
    a, b = ("@adminvm" if token in _DOM0 else token for token in (a, b))
    if a == b or "*" in (a, b):
        return True
    if "@anyvm" in (a, b):
        return "@adminvm" not in (a, b)
    if _source_kind(a)[0] == _NAMED == _source_kind(b)[0]:
        return "@adminvm" not in (a, b) and a.startswith("uuid:") != b.startswith("uuid:")
    return True


class _Routed:
    """The callers the routing (``@default``) grants of one service and argument column name,
    summed up so that :func:`_may_share_a_caller` against all of them is one look-up."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.anyvm = self.broad = False
        """``broad``: ``*``, a tag or a type, any of which may match any qube."""
        self.names = {False: False, True: False}
        """Whether named qubes other than dom0 are routed, by whether they are ``uuid:`` tokens."""

    def add(self, token: str) -> None:
        token = "@adminvm" if token in _DOM0 else token
        self.tokens.add(token)
        if token == "@anyvm":
            self.anyvm = True
        elif _source_kind(token)[0] != _NAMED:  # "*" (everyone), a tag or a type
            self.broad = True
        elif token != "@adminvm":
            self.names[token.startswith("uuid:")] = True

    def may_share(self, token: str) -> bool:
        """Whether ``_may_share_a_caller(token, r)`` for some routed ``r``."""
        token = "@adminvm" if token in _DOM0 else token
        if not self.tokens:
            return False
        if token in self.tokens or token == "*" or self.broad:
            return True
        if token == "@anyvm":
            return self.tokens != {"@adminvm"}
        if _source_kind(token)[0] != _NAMED:  # a tag or a type: any qube may carry it
            return True
        if token == "@adminvm":
            return False  # only @adminvm itself (above), or * and groups, match dom0
        return self.anyvm or self.names[not token.startswith("uuid:")]


def _default_denies(text: list[str | _Line]) -> Iterator[str | _Line]:
    """Each ``@default`` deny, only for the arguments where a line of the same service routes
    @default here to a caller it may also match.  A deny must cover every target form a
    broader grant covers; but where no line of ours would take the call, a ``@default`` deny
    would only take it from other qubes' policy files (the first match wins across files).
    The routing grants are summed up per service and argument once: linear in the lines."""
    routed: dict[str, dict[str, _Routed]] = {}
    for line in text:
        if isinstance(line, _Line) and line.target == "@default" and line.action != "deny":
            routed.setdefault(line.service, {}).setdefault(line.argument, _Routed()).add(line.source)
    for item in text:
        if not isinstance(item, _Line) or item.target != "@default" or item.action != "deny":
            yield item
            continue
        columns = routed.get(item.service, {})
        candidates = columns if item.argument == "*" else {a: columns[a] for a in (item.argument, "*") if a in columns}
        reach = {argument for argument, grants in candidates.items() if grants.may_share(item.source)}
        # A ``*`` deny that only routed ``+ARG`` lines need is narrowed to those arguments.
        arguments = [item.argument] if item.argument in reach or "*" in reach else sorted(reach)
        yield from (replace(item, argument=argument) for argument in arguments)


def _with_key_denies(sub: Policy, key: Policy) -> Policy:
    """An ``arguments`` entry with its key's denies: a caller the key denies is denied every
    argument, unless the entry names that very caller in its own allow or ask (its lines come
    first, so without them a broader grant there would let the caller in)."""
    if not sub.grants():  # nothing here lets anyone in: the call goes on to the key's own lines
        return sub
    named = {*sub.allow, *sub.ask, *sub.deny}
    extra = tuple(caller for caller in key.deny if caller not in named)
    return replace(sub, deny=(*sub.deny, *extra)) if extra else sub


def _column(key: str) -> tuple[str, str]:
    """(service, argument column) of a declared key: ``NAME`` -> ``*`` (every argument),
    ``NAME+`` -> ``+``, ``NAME+ARG`` -> ``+ARG`` (parse_service_and_argument's form)."""
    name, argument = qrexec.split_service(key)
    return name, "*" if argument is None else f"+{argument}"


def lines(manifest: Manifest, qube: str, origin: str = "") -> list[str]:
    """The policy text for ``manifest``'s services and forwards, served by ``qube``
    (``origin`` says where the name came from, for the header)."""
    target = this_qube(qube)
    entries: dict[str, tuple[Policy | None, str]] = {}
    for key, (daemon, service) in manifest.services().items():
        entries[key] = (manifest.policies.get(key), f"handler {service.handler} (daemon {daemon.name})")
    for key, forward in manifest.forwards.items():
        what = f"forward to {forward.target}"
        takes = qrexec.is_tcp_link(forward.link_target) and forward.link_target.count("/") < 4  # no /PORT
        if takes and "+" not in key:
            picks = "host and port" if forward.link_target == qrexec.TCP_LINK else "port"
            what += f"; the argument picks the {picks}: a * line allows any, policy.arguments lists some"
        entries[key] = (manifest.policies.get(key), what)
    source = os.path.abspath(manifest.path)
    text: list[str | _Line] = [
        f"# qrexec policy for the services of qube {qube}{f' ({origin})' if origin else ''}, from {source}",
        "# (generated by qubes-socksvc policy).",
        f"# Review it, then install it in dom0, e.g. as /etc/qubes/policy.d/30-socksvc-{qube.lstrip('@')}.policy;",
        "# the first matching line wins, so place it before any broader rules for these services.",
    ]
    # NAME+ARG keys before NAME, so that their lines come first.
    for key in sorted(entries, key=lambda k: (qrexec.split_service(k)[0], "+" not in k, k)):
        policy, what = entries[key]
        name, argument = _column(key)
        general = entries.get(name, (None, ""))[0] if argument != "*" else None
        text += ["", f"# {key}: {what}"]
        if policy is not None and (policy.grants() or policy.deny or policy.arguments):
            # An ``arguments`` entry refines its key's callers: @default comes here if either says so.
            for arg, sub in policy.arguments:
                _extend(text, _rules(name, f"+{arg}", _with_key_denies(sub, policy), target,
                                     sub.default_target or policy.default_target), manifest.path)
            _extend(text, _rules(name, argument, policy, target, policy.default_target), manifest.path)
        else:
            text.append(f"# no policy: in the manifest, so no line allows {key}")
            if general is None or not general.grants():
                text.append(_Line(name, argument, "@anyvm", target, "deny", commented=True))
        if general is not None and general.grants():
            text.append(f"# not {name}'s callers, unless allowed above:")
            _extend(text, _closing(name, argument, general, target), manifest.path)
    return _aligned(list(_default_denies(text)))


#: The most lines ``policy`` writes.  Some lines multiply (a key's denies are written into each
#: of its ``arguments`` entries that grant, NAME's callers are denied on each declared NAME+ARG
#: key): far more than a reviewer can read, and bounded so that no manifest makes unbounded work.
MAX_LINES = 100_000


class PolicyTooLarge(SocksvcError):
    pass


def _extend(text: list[str | _Line], lines: Iterable[_Line], path: str) -> None:
    """Add ``lines``, refusing to go past MAX_LINES (checked as they come: the work stops there)."""
    for line in lines:
        text.append(line)
        if len(text) > MAX_LINES:
            raise PolicyTooLarge(f"{path}: the policy would be more than {MAX_LINES} lines: a key's denies are "
                                 "repeated in each of its arguments entries that grant, and NAME's callers are "
                                 "denied on each declared NAME+ARG key; name fewer callers there (a @tag: or "
                                 "@type: names many qubes in one line)")


def _aligned(text: list[str | _Line]) -> list[str]:
    rows = [item.columns() for item in text if isinstance(item, _Line)]
    widths = [max((len(r[i]) for r in rows if len(r) > i), default=0) for i in range(5)]
    out = []
    for item in text:
        if isinstance(item, str):
            out.append(item)
            continue
        columns = item.columns()
        out.append("  ".join([*(c.ljust(w) for c, w in zip(columns[:5], widths, strict=True)), *columns[5:]]).rstrip())
    return out


def default_qube() -> tuple[str, str]:
    """(this qube's name, where it came from): ``qubesdb-read /name`` in a qube,
    else the host name (which Qubes sets to the qube's name)."""
    import shutil
    import socket
    import subprocess

    if shutil.which("qubesdb-read"):
        try:
            result = subprocess.run(["qubesdb-read", "/name"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip(), "qubesdb-read /name"
    return socket.gethostname().partition(".")[0], "the host name"
