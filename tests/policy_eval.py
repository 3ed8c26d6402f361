# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""dom0's policy evaluation, restated for tests from qubes-core-qrexec 4.4.2
``qrexec/policy/parser.py`` (not from our generator, and with no qrexec to import).

A :class:`SystemInfo` of fake qubes stands in for dom0's ``internal.GetSystemInfo``
(``qrexec/utils.py: get_system_info``); :func:`evaluate` is ``AbstractPolicy.evaluate``
for one ``Request``: the first rule whose service, argument, source and target match
decides, then its action resolves the target.  Each function names what it mirrors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["allow", "ask", "deny"]

#: parser.py: is_dom0.
DOM0_TOKENS = ("@adminvm", "dom0", "uuid:00000000-0000-0000-0000-000000000000")


def is_dom0(token: str) -> bool:
    """parser.py: is_dom0: dom0, ``@adminvm`` and the zero UUID are the same qube."""
    return token in DOM0_TOKENS


# --- system info ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """One qube as ``internal.GetSystemInfo`` describes it (utils.py: SystemInfoEntry)."""

    name: str
    uuid: str
    type: str = "AppVM"
    tags: tuple[str, ...] = ()
    template_for_dispvms: bool = False
    default_dispvm: str | None = None
    power_state: str = "Running"
    internal: bool = False


class SystemInfo:
    """The domains by name and by ``uuid:UUID`` (utils.py: get_system_info adds the uuid: keys)."""

    def __init__(self, domains: Iterable[Domain]) -> None:
        self.domains = tuple(domains)
        self._by_key = {key: d for d in self.domains for key in (d.name, f"uuid:{d.uuid}")}

    def get(self, key: str | None) -> Domain | None:
        return self._by_key.get(key) if key is not None else None

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def names(self) -> Iterator[str]:
        """The keys that are names (the ``expand`` methods skip the ``uuid:`` keys)."""
        return (d.name for d in self.domains)

    def uuid_to_name(self, token: str) -> str:
        """utils.py: uuid_to_name (KeyError for an unknown UUID, as there)."""
        if token.startswith("uuid:"):
            return self._by_key[token].name
        if token.startswith("@dispvm:uuid:"):
            return "@dispvm:" + self._by_key[token[len("@dispvm:"):]].name
        return token

    def as_qrexec(self) -> dict[str, dict[str, dict[str, object]]]:
        """The same, in the dict form ``Request(system_info=...)`` takes."""
        return {"domains": {key: {"name": d.name, "uuid": d.uuid, "type": d.type, "tags": list(d.tags),
                                  "template_for_dispvms": d.template_for_dispvms,
                                  "default_dispvm": d.default_dispvm, "power_state": d.power_state,
                                  "internal": d.internal, "icon": "", "guivm": None}
                            for key, d in self._by_key.items()}}


def dispvm_template(source: str, info: SystemInfo) -> str | None:
    """DispVM.get_dispvm_template: ``@dispvm`` for ``source`` is its default_dispvm's template."""
    domain = info.get(source)
    if domain is None or domain.default_dispvm is None:
        return None
    return "@dispvm:" + domain.default_dispvm


# --- tokens --------------------------------------------------------------------------------


def match_strings(info: SystemInfo, token: str, other: str) -> bool:
    """parser.py: match_strings: equal, or a ``uuid:`` that is the other's UUID."""
    if token.startswith("uuid:"):
        if other.startswith("uuid:"):
            return token == other
        domain = info.get(other)
        return domain is not None and token[5:] == domain.uuid
    if other.startswith("uuid:"):
        domain = info.get(token)
        return domain is not None and other[5:] == domain.uuid
    return token == other


def matches(token: str, other: str, info: SystemInfo, source: str | None = None) -> bool:
    """``VMToken.match`` and its overrides: does a rule's source or target token match the
    request's ``other`` (its source, a plain name; or its target, typed by its text)?"""
    if token == "*":                                     # WildcardVM.match
        return True
    if token == "@adminvm":                              # AdminVM.match
        return is_dom0(other)
    if token == "@anyvm":                                # AnyVM.match: everything but dom0
        return not is_dom0(other)
    if token == "@dispvm":                               # DispVM.match
        return other == "@dispvm"
    if token.startswith(("@type:", "@tag:")):            # TypeVM.match, TagVM.match
        domain = info.get(other)
        if domain is None:
            return False
        return domain.type == token[6:] if token.startswith("@type:") else token[5:] in domain.tags
    if token.startswith("@dispvm:@tag:"):                # DispVMTag.match: only @dispvm targets
        template = dispvm_template(source, info) if other == "@dispvm" and source else other
        if template is None or not template.startswith("@dispvm:"):
            return False
        domain = info.get(template[len("@dispvm:"):])
        return domain is not None and domain.template_for_dispvms and token[13:] in domain.tags
    if token.startswith("@dispvm:"):                     # DispVMTemplate.match: only @dispvm targets
        if other == "@dispvm" and source is not None:
            template = dispvm_template(source, info)
            return template is not None and match_strings(info, token, template)
        return other.startswith("@dispvm:") and match_strings(info, token[8:], other[8:])
    if is_dom0(token):                                   # VMToken.match (a name, uuid:, @default)
        return is_dom0(other)
    return match_strings(info, token, other)


def expand(token: str, info: SystemInfo) -> Iterator[str]:
    """``_BaseTarget.expand`` and its overrides: the targets a rule's target (or redirect) offers
    an ``ask`` (for AbstractPolicy.collect_targets_for_ask)."""
    templates = [d.name for d in info.domains if d.template_for_dispvms]
    if token in ("*", "@anyvm"):                         # WildcardVM.expand, AnyVM.expand
        yield from (n for n in info.names() if token == "*" or not is_dom0(n))
        yield from (f"@dispvm:{n}" for n in templates)
        yield "@dispvm"
    elif token in ("@adminvm", "@dispvm"):               # AdminVM.expand, DispVM.expand
        yield token
    elif token.startswith("@type:"):                     # TypeVM.expand
        yield from (d.name for d in info.domains if d.type == token[6:])
    elif token.startswith("@tag:"):                      # TagVM.expand
        yield from (d.name for d in info.domains if token[5:] in d.tags)
    elif token.startswith("@dispvm:@tag:"):              # DispVMTag.expand
        yield from (f"@dispvm:{d.name}" for d in info.domains if d.template_for_dispvms and token[13:] in d.tags)
    elif token.startswith("@dispvm:"):                   # DispVMTemplate.expand
        domain = info.get(token[8:])
        if domain is not None and domain.template_for_dispvms:
            yield info.uuid_to_name(token)
    elif token != "@default" and token in info:          # _BaseTarget.expand (DefaultVM: nothing)
        yield info.uuid_to_name(token)


# --- rules ---------------------------------------------------------------------------------


class PolicySyntaxError(ValueError):
    """A line qrexec's parser refuses (exc.PolicySyntaxError); only what evaluation needs."""


@dataclass(frozen=True)
class Rule:
    """One policy line (parser.py: Rule; ``*`` service or argument is None there)."""

    service: str | None
    argument: str | None
    source: str
    target: str
    action: Action
    params: dict[str, str] = field(hash=False)
    lineno: int

    @classmethod
    def from_line(cls, line: str, lineno: int) -> Rule:
        """Rule.from_line: whitespace-split ``SERVICE ARGUMENT SOURCE TARGET ACTION [K=V ...]``."""
        fields = line.split()
        if len(fields) < 5:
            raise PolicySyntaxError(f"line {lineno}: wrong number of fields")
        service, argument, source, target, action, *params = fields
        if action not in ("allow", "ask", "deny"):
            raise PolicySyntaxError(f"line {lineno}: invalid action: {action}")
        if source == "@default" or source == "@dispvm":
            raise PolicySyntaxError(f"line {lineno}: invalid source token: {source!r}")  # no Source class
        kwds = dict(param.split("=", 1) for param in params)
        if len(kwds) != len(params):
            raise PolicySyntaxError(f"line {lineno}: parameter given twice")
        if target == "@default" and action == "allow" and "target" not in kwds:
            raise PolicySyntaxError(f"line {lineno}: allow action for @default rule must specify target= option")
        return cls(None if service == "*" else service, None if argument == "*" else argument,
                   source, target, action, kwds, lineno)  # type: ignore[arg-type]  # action checked above

    def is_match_but_target(self, service: str, argument: str, source: str, info: SystemInfo) -> bool:
        """Rule.is_match_but_target: service, argument (``+ARG`` as called) and source."""
        return (self.service in (None, service) and self.argument in (None, argument)
                and matches(self.source, source, info))

    def is_match(self, service: str, argument: str, source: str, target: str, info: SystemInfo) -> bool:
        """Rule.is_match: and the target, with the source (for ``@dispvm``'s template)."""
        return (self.is_match_but_target(service, argument, source, info)
                and matches(self.target, target, info, source=source))

    @property
    def autostart(self) -> bool:
        return self.params.get("autostart", "yes") == "yes"


def parse(text: str) -> list[Rule]:
    """AbstractParser.load_policy_file: strip each line, skip blank lines and ``#`` comments
    (``!`` directives are not ours to write, so they are refused here)."""
    rules = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise PolicySyntaxError(f"line {lineno}: directives are not restated here")
        rules.append(Rule.from_line(line, lineno))
    return rules


def parse_service_and_argument(call: str) -> tuple[str, str]:
    """parser.py: parse_service_and_argument: split at the first ``+``; no ``+`` is argument ``+``."""
    service, _, argument = call.partition("+")
    return service, "+" + argument


# --- evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What dom0 does with a request: ``lineno`` of the rule that decided (None: no rule, or
    the request itself was refused), the allowed ``target``, or an ask's ``targets`` and
    ``default_target``."""

    action: Action
    lineno: int | None = None
    target: str | None = None
    targets: frozenset[str] = frozenset()
    default_target: str | None = None
    reason: str = ""


class _Refused(Exception):
    pass


def intended_target(target: str, info: SystemInfo) -> str:
    """Request.__init__ (an empty target is ``@default``) and IntendedTarget.verify: a name
    dom0 does not know becomes ``@default``; ``@dispvm:X`` must name a disposable template."""
    if target == "":
        target = "@default"
    if target in ("@adminvm", "@default", "@dispvm"):
        return target
    if target.startswith("@dispvm:") and target[8:] and not target[8:].startswith("@"):
        domain = info.get(target[8:])
        if domain is None or not domain.template_for_dispvms:
            raise _Refused(f"not a template for dispvm: {target[8:]}")
        return target
    if target.startswith("@") or target == "*":
        raise PolicySyntaxError(f"invalid intendedtarget token: {target!r}")
    return target if target in info else "@default"


def allow_no_autostart(target: str, info: SystemInfo) -> bool:
    """ActionType.allow_no_autostart: dom0 is always up, a disposable never is."""
    if is_dom0(target):
        return True
    if target.startswith("@dispvm"):
        return False
    domain = info.get(target)
    return domain is not None and domain.power_state == "Running"


def collect_targets_for_ask(rules: list[Rule], service: str, argument: str, source: str,
                            info: SystemInfo) -> set[str]:
    """AbstractPolicy.collect_targets_for_ask: over the rules matching all but the target, last
    to first, a deny removes its target's expansion and allow/ask add their redirect's (or
    target's); ``@dispvm`` and ``@adminvm`` resolved, the caller itself and internal qubes out."""
    targets: set[str] = set()
    for rule in reversed(rules):
        if not rule.is_match_but_target(service, argument, source, info):
            continue
        offered = set()
        for token in expand(rule.params.get("target") or rule.target if rule.action != "deny" else rule.target, info):
            try:
                offered.add(info.uuid_to_name(token))
            except KeyError:
                continue
        if rule.action == "deny":
            targets -= offered
        else:
            targets |= offered
    if "@dispvm" in targets:
        targets.remove("@dispvm")
        template = dispvm_template(source, info)
        if template is not None:
            targets.add(template)
    if "@adminvm" in targets:
        targets.remove("@adminvm")
        targets.add("dom0")
    caller = info.get(source)
    if caller is not None:
        targets -= {caller.name, f"uuid:{caller.uuid}"}
    return {t for t in targets if not (d := info.get(t.removeprefix("@dispvm:"))) or not d.internal}


def _allow(rule: Rule, source: str, target: str, info: SystemInfo) -> Decision:
    """Allow.evaluate: the redirect (``target=``) or the request's target, resolved."""
    actual = intended_target(rule.params["target"], info) if "target" in rule.params else target
    if actual == "@default":
        return Decision("deny", rule.lineno, reason="allow, but no target is specified by caller or policy")
    if actual == "@dispvm":
        template = dispvm_template(source, info)
        if template is None:
            return Decision("deny", rule.lineno, reason="allow to @dispvm, but no DispVM base is set")
        actual = template
    elif actual == "@adminvm":
        actual = "dom0"
    if not rule.autostart and not allow_no_autostart(actual, info):
        return Decision("deny", rule.lineno, reason=f"target {actual} would require autostart")
    return Decision("allow", rule.lineno, target=actual)


def _ask(rules: list[Rule], rule: Rule, service: str, argument: str, source: str, info: SystemInfo) -> Decision:
    """Ask.evaluate: the redirect alone, or every target the policy offers this caller."""
    redirect = rule.params.get("target")
    if redirect is not None:
        targets = {"dom0" if is_dom0(redirect) else redirect}
    else:
        targets = collect_targets_for_ask(rules, service, argument, source, info)
    if not rule.autostart:
        targets = {t for t in targets if allow_no_autostart(t, info)}
    if not targets:
        return Decision("deny", rule.lineno, reason="ask, but no target is available to choose from")
    default = rule.params.get("default_target")
    if default == "@dispvm":
        default = dispvm_template(source, info)
    elif default is not None and is_dom0(default):
        default = "dom0"
    return Decision("ask", rule.lineno, targets=frozenset(targets),
                    default_target=default if default in targets else None)


def evaluate(rules: list[Rule], call: str, source: str, target: str, info: SystemInfo) -> Decision:
    """AbstractPolicy.evaluate for ``Request(service, argument, source, target)``:
    find_matching_rule (the first that matches), then its action's ``evaluate``."""
    service, argument = parse_service_and_argument(call)
    try:
        target = intended_target(target, info)
    except _Refused as refused:
        return Decision("deny", reason=str(refused))
    rule = next((r for r in rules if r.is_match(service, argument, source, target, info)), None)
    if rule is None:
        return Decision("deny", reason="no matching rule found")
    if rule.action == "deny":
        return Decision("deny", rule.lineno, reason="denied by policy")
    try:
        if rule.action == "allow":
            return _allow(rule, source, target, info)
        return _ask(rules, rule, service, argument, source, info)
    except _Refused as refused:
        return Decision("deny", rule.lineno, reason=str(refused))
