# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``qubes-socksvc policy`` judged by evaluation: dom0 decides what the manifest says.

The generated lines go through ``tests/policy_eval.py`` (qrexec 4.4.2's
``qrexec/policy/parser.py``, restated: ``Rule``, ``Request``, ``AbstractPolicy.evaluate``,
``VMToken.match`` and its overrides) for every kind of caller and every form of target,
and each decision is compared with one computed from the manifest's own entries, as the
README's Policy section states them: the entry that names the caller decides (a declared
``NAME+ARG`` key alone; an ``arguments`` entry before its key); within an entry the most
specific caller (a name, then tags and types, then everyone), deny before ask before allow.
The evaluator was compared with qrexec's own parser outside the suite (no qrexec in CI).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qubes_socksvc import manifest, model, policy
from qubes_socksvc.model import Policy
from tests import policy_eval
from tests.policy_eval import Decision, Domain, SystemInfo, evaluate, parse

# --- dom0's qubes (the only stand-in: there is no Xen here) ---------------------------------


def _uuid(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-{n:012x}"


WEB = Domain("web", _uuid(1), default_dispvm="web-dvm")
QUBES = SystemInfo([
    WEB,
    Domain("work", _uuid(2), tags=("trusted",), default_dispvm="web-dvm"),
    Domain("evil", _uuid(3), tags=("untrusted",), default_dispvm="web-dvm"),
    Domain("personal", _uuid(4), type="StandaloneVM", default_dispvm=None),
    Domain("disp123", _uuid(5), type="DispVM", default_dispvm="web-dvm"),
    Domain("web-dvm", _uuid(6), tags=("dvm",), template_for_dispvms=True, power_state="Halted"),
    Domain("dom0", "00000000-0000-0000-0000-000000000000", type="AdminVM", tags=("trusted",)),
])
EVIL_UUID = "uuid:" + _uuid(3)

#: The manifest's caller tokens, and (written out, not computed) the qubes each one names:
#: qrexec's meaning of a Source token (parser.py: VMToken.match, AnyVM.match excludes dom0,
#: WildcardVM.match does not; TagVM.match, TypeVM.match).
NAMES = {
    "work": {"work"}, "evil": {"evil"}, EVIL_UUID: {"evil"}, "personal": {"personal"}, "dom0": {"dom0"},
    "@adminvm": {"dom0"}, "@tag:trusted": {"work", "dom0"}, "@tag:untrusted": {"evil"},
    "@type:DispVM": {"disp123"}, "@type:StandaloneVM": {"personal"},
    "@anyvm": {"work", "evil", "personal", "disp123", "web-dvm", "web"},
    "*": {"work", "evil", "personal", "disp123", "web-dvm", "web", "dom0"},
}
CALLERS = sorted(NAMES)
#: Who calls: each qube by name and by ``uuid:`` (match_strings takes either).
SOURCES = [(d.name, form) for d in QUBES.domains for form in (d.name, f"uuid:{d.uuid}")]


def tier(token: str) -> int:
    """README: names first, then tags and types, then everyone."""
    return 2 if token in ("*", "@anyvm") else 1 if token.startswith(("@tag:", "@type:")) else 0


# --- what the manifest says ------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One policy entry as the call meets it: its callers, and whether @default comes here."""

    allow: tuple[str, ...] = ()
    ask: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    routes: bool = False

    def verdict(self, qube: str) -> str | None:
        """The most specific caller naming ``qube``; deny, then ask, then allow among equals."""
        named = [(tier(t), i, verb) for i, verb in enumerate(("deny", "ask", "allow"))
                 for t in getattr(self, verb) if qube in NAMES[t]]
        return min(named)[2] if named else None


def declared(parsed: model.Manifest) -> dict[str, Policy | None]:
    return {k: parsed.policies.get(k) for k in [*parsed.services(), *parsed.forwards]}


def entries(keys: dict[str, Policy | None], call: str) -> tuple[list[Entry], bool]:
    """The entries a call meets, in order, and whether any routes @default for it:
    a declared ``NAME+ARG`` key alone (``NAME``'s callers refused); else the ``arguments``
    entry for ARG (routing @default where it or its key says so), then ``NAME``."""
    name, _, argument = call.partition("+")
    general = keys.get(name)
    routed = general is not None and general.default_target and bool(general.grants())
    if f"{name}+{argument}" in keys:
        own = keys[f"{name}+{argument}"]
        chain = [Entry(own.allow, own.ask, own.deny, own.default_target)] if own else []
        if general is not None:
            chain.append(Entry(deny=(*general.grants(), *general.deny)))
        return chain, routed or bool(own and own.default_target and own.grants())
    if general is None:
        return [], False
    chain = [Entry(general.allow, general.ask, general.deny, general.default_target)]
    sub = dict(general.arguments).get(argument) if argument else None
    if sub is not None:
        routes = sub.default_target or general.default_target
        # The key's denies hold for every argument unless the entry names that caller itself
        # (an entry that grants nothing leaves every caller to the key's own lines).
        named = {*sub.allow, *sub.ask, *sub.deny}
        denies = (*sub.deny, *(c for c in general.deny if c not in named and sub.grants()))
        chain.insert(0, Entry(sub.allow, sub.ask, denies, routes))
        routed = routed or (routes and bool(sub.grants()))
    return chain, routed


#: Outcomes: None (no line of ours matches: other files decide), "deny", (verb, this qube),
#: or REFUSED (deny or None: not this qube, and not another file's business either way).
REFUSED = "refused"
Outcome = str | tuple[str, str] | None


def expected(keys: dict[str, Policy | None], call: str, qube: str, target: str, this: str) -> Outcome:
    chain, routed = entries(keys, call)
    verdict, deciding = next(((v, e) for e in chain if (v := e.verdict(qube))), (None, None))
    if target in ("@default", "nosuch"):  # IntendedTarget.verify: an unknown name is @default
        if verdict in ("allow", "ask") and deciding is not None and deciding.routes:
            return verdict, this
        return REFUSED if routed else None  # no @default line where nothing routes it here
    if target in ("@dispvm", "work", "@dispvm:web-dvm"):
        return None  # never this qube: our lines leave other targets alone
    return None if verdict is None else verdict if verdict == "deny" else (verdict, this)


def observed(decision: Decision, this: str) -> Outcome:
    if decision.lineno is None:
        assert decision.reason == "no matching rule found", decision
        return None
    if decision.action == "deny":
        return "deny"
    if decision.action == "allow":
        assert decision.target is not None
        return "allow", QUBES.uuid_to_name(decision.target)
    if decision.targets != {this} or decision.default_target != this:
        return "ask", f"{sorted(decision.targets)} default {decision.default_target}"
    return "ask", this


# --- manifests covering the combinations ---------------------------------------------------


def _entry_yaml(rng: random.Random, depth: int, arguments: tuple[str, ...]) -> str:
    tokens = rng.sample(CALLERS, rng.randint(1, 5))
    verbs: dict[str, list[str]] = {"allow": [], "ask": [], "deny": []}
    for token in tokens:
        verbs[rng.choice(("allow", "ask", "deny", "deny"))].append(token)
    fields = [f"{verb}: [{', '.join(repr(t) for t in callers)}]" for verb, callers in verbs.items() if callers]
    if rng.random() < 0.5:
        fields.append("default_target: true")
    if rng.random() < 0.2:
        fields.append(f"autostart: {rng.choice(('true', 'false'))}")
    if depth == 0 and arguments:
        subs = [f"{a}: {_entry_yaml(rng, 1, ())}" for a in arguments if rng.random() < 0.7]
        if subs:
            fields.append(f"arguments: {{{', '.join(subs)}}}")
    return f"{{{', '.join(fields)}}}"


LAYOUTS = [("N",), ("N", "N+a"), ("N+a",), ("N", "N+"), ("N", "N+", "N+a"), ("N+", "N+a")]


def generated(seed: int) -> str:
    """A manifest of one layout of keys (services or forwards), each with a random entry
    or none, arguments under ``NAME``: every mix of allow/ask/deny and default_target."""
    rng = random.Random(seed)
    keys = LAYOUTS[seed % len(LAYOUTS)]
    forwards = seed % 2 == 1
    lines = ["version: 1", "forwards:" if forwards else "daemons:\n  d:\n    services:"]
    for n, key in enumerate(keys):
        name = key.replace("N", "my.Svc", 1)
        indent = "  " if forwards else "      "
        lines.append(f"{indent}{name}:")
        lines.append(f"{indent}  target: unix:/run/qubes/fwd{n}.sock" if forwards
                     else f"{indent}  handler: qubes_socksvc.examples:echo")
        if rng.random() < 0.85:
            arguments = ("b", "c") if "N+a" in keys else ("a", "b")
            lines.append(f"{indent}  policy: {_entry_yaml(rng, 0 if key == 'N' else 1, arguments)}")
    return "\n".join(lines) + "\n"


#: The issue's cases, by hand (issue 21, point 1): a deny beside @anyvm with default_target,
#: beside an ask, inside arguments, and NAME's callers closed off a NAME+ARG key.
REPORTED = {
    "deny beside allow": "{allow: ['@anyvm'], deny: [evil], default_target: true}",
    "deny beside ask": "{ask: ['@anyvm'], deny: ['@tag:untrusted'], default_target: true}",
    "deny in arguments": "{allow: ['@anyvm'], default_target: true, arguments: {a: {deny: [evil]}}}",
    "key deny under an arguments grant": "{allow: ['@anyvm'], deny: [evil], arguments: {a: {allow: ['@anyvm']}}}",
}


def reported(entry: str, extra: str = "") -> str:
    return (f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc:\n        handler: qubes_socksvc.examples:echo\n"
            f"        policy: {entry}\n{extra}")


CLOSING = reported("{allow: ['@anyvm', '@adminvm'], default_target: true}",
                   "      my.Svc+a:\n        handler: qubes_socksvc.examples:echo\n        policy: {allow: [work]}\n")
MANIFESTS = {**{name: reported(text) for name, text in REPORTED.items()}, "closing": CLOSING,
             **{f"generated {seed}": generated(seed) for seed in range(120)}}
CALLS = ["my.Svc", "my.Svc+", "my.Svc+a", "my.Svc+b", "my.Svc+zz"]


def requests(this: Domain) -> Iterator[tuple[str, str, str]]:
    """(call, caller, target form): every target form of this qube and of others."""
    names = ("dom0", "@adminvm") if this.name == "dom0" else (this.name,)
    targets = (*names, f"uuid:{this.uuid}", "@default", "nosuch", "@dispvm", "@dispvm:web-dvm", "work")
    for call in CALLS:
        for qube, source in SOURCES:
            if qube != this.name:  # a qube calling itself: not the policy's question
                for target in targets:
                    yield call, source, target


def check(text: str, this: Domain) -> list[str]:
    parsed = manifest.parse(text, "/m.yaml")
    rules = parse("\n".join(policy.lines(parsed, this.name)))
    keys = declared(parsed)
    wrong = []
    for call, source, target in requests(this):
        qube = QUBES.uuid_to_name(source)
        want = expected(keys, call, qube, target, this.name)
        got = observed(evaluate(rules, call, source, target, QUBES), this.name)
        if got != want and not (want == REFUSED and got in ("deny", None)):
            wrong.append(f"{call} from {source} to {target}: {got}, manifest says {want}")
    return wrong


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_dom0_decides_what_the_manifest_says(name: str) -> None:
    """Every caller kind (a name, uuid:, @anyvm, @tag:, @type:, a disposable, dom0) against every
    target form (this qube's name, uuid:, @default, an unknown name, @dispvm), with and without
    arguments: AbstractPolicy.evaluate's first match gives the manifest's verdict."""
    wrong = check(MANIFESTS[name], WEB)
    assert wrong == [], "\n".join([MANIFESTS[name], *wrong[:10]])


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_dom0_as_the_qube_that_serves(name: str) -> None:
    """dom0 as the target: @adminvm, dom0 and the zero UUID are one qube (parser.py: is_dom0)."""
    dom0 = QUBES.get("dom0")
    assert dom0 is not None
    wrong = check(MANIFESTS[name], dom0)
    assert wrong == [], "\n".join([MANIFESTS[name], *wrong[:10]])


def test_a_key_deny_holds_under_an_arguments_grant() -> None:
    """The adversary's case: a key denying evil, an ``arguments`` entry allowing @anyvm.  The
    entry's lines come first (AbstractPolicy.evaluate: first match), so the key's deny is
    written into it; evil is refused every argument and target form, others are let in."""
    rules = parse("\n".join(policy.lines(manifest.parse(reported(REPORTED["key deny under an arguments grant"]),
                                                        "/m.yaml"), "web")))
    for call in ("my.Svc+a", "my.Svc+b", "my.Svc"):
        for target in ("web", f"uuid:{WEB.uuid}", "@default", "", "nosuch"):
            assert evaluate(rules, call, "evil", target, QUBES).action == "deny", (call, target)
    assert evaluate(rules, "my.Svc+a", "work", "web", QUBES).action == "allow"


def test_the_reported_bypass_is_denied_for_every_target_form() -> None:
    """issue 21: evil named a deny beside @anyvm's allow with default_target, and called @default."""
    rules = parse("\n".join(policy.lines(manifest.parse(reported(REPORTED["deny beside allow"]), "/m.yaml"), "web")))
    for target in ("web", f"uuid:{WEB.uuid}", "@default", "", "nosuch"):
        assert evaluate(rules, "my.Svc+x", "evil", target, QUBES).action == "deny", target
    allowed = evaluate(rules, "my.Svc+x", "work", "", QUBES)
    assert (allowed.action, allowed.target) == ("allow", "web")


def test_no_default_deny_where_nothing_routes_default() -> None:
    """A ``SVC * evil @default deny`` where no line of ours routes @default would take evil's
    @default calls from other qubes' policy files (AbstractPolicy.find_matching_rule: first match)."""
    text = reported("{allow: [work], ask: ['@anyvm'], deny: [evil], arguments: {a: {deny: [personal]}}}")
    rules = parse("\n".join(policy.lines(manifest.parse(text, "/m.yaml"), "web")))
    assert {rule.target for rule in rules} == {"web"}
    routed_for_work = reported("{allow: [work], deny: [evil], default_target: true}")
    rules = parse("\n".join(policy.lines(manifest.parse(routed_for_work, "/m.yaml"), "web")))
    assert evaluate(rules, "my.Svc", "evil", "@default", QUBES).reason == "no matching rule found"


def test_the_expectation_can_fail() -> None:
    """The comparison is not vacuous: the issue's lines (HEAD before the fix) are caught."""
    old = parse("my.Svc * evil web deny\nmy.Svc * @anyvm web allow\nmy.Svc * @anyvm @default allow target=web\n")
    keys = declared(manifest.parse(reported(REPORTED["deny beside allow"]), "/m.yaml"))
    want = expected(keys, "my.Svc+x", "evil", "@default", "web")
    assert want == REFUSED and observed(evaluate(old, "my.Svc+x", "evil", "@default", QUBES), "web") == ("allow", "web")


# --- the evaluator itself: qrexec's rules, each as parser.py has it --------------------------


def decide(lines: str, call: str, source: str, target: str) -> Decision:
    return evaluate(parse(lines), call, source, target, QUBES)


def test_first_match_wins() -> None:
    """AbstractPolicy.find_matching_rule: the first rule that matches decides, nothing after it."""
    assert decide("s * work web deny\ns * work web allow\n", "s", "work", "web").action == "deny"
    assert decide("s * work web allow\ns * work web deny\n", "s", "work", "web").action == "allow"
    assert decide("s * work web allow\n", "s", "evil", "web") == Decision("deny", reason="no matching rule found")


def test_service_and_argument_columns() -> None:
    """parse_service_and_argument: a call without + has argument +; Rule: * matches every argument."""
    lines = "s +a work web allow\ns + evil web allow\n* * personal web allow\n"
    assert decide(lines, "s+a", "work", "web").action == "allow"
    assert decide(lines, "s+ab", "work", "web").lineno is None
    assert decide(lines, "s", "evil", "web").action == "allow" and decide(lines, "s+", "evil", "web").lineno == 2
    assert decide(lines, "other+x+y", "personal", "web").action == "allow"


@pytest.mark.parametrize("token, sources", [
    ("@anyvm", {"work", "evil", "personal", "disp123", "web-dvm", "web"}),   # AnyVM.match: not dom0
    ("*", {d.name for d in QUBES.domains}),                                # WildcardVM.match
    ("@adminvm", {"dom0"}), ("dom0", {"dom0"}),                            # AdminVM.match, is_dom0
    ("@tag:trusted", {"work", "dom0"}), ("@type:DispVM", {"disp123"}),      # TagVM.match, TypeVM.match
    (EVIL_UUID, {"evil"}), ("evil", {"evil"}),                             # match_strings
    ("@dispvm:web-dvm", set()), ("@dispvm:@tag:dvm", set()),               # DispVMTemplate/DispVMTag.match
])
def test_source_tokens(token: str, sources: set[str]) -> None:
    """Rule.is_match_but_target: which callers, by name or uuid:, a source token matches."""
    for qube, source in SOURCES:
        assert (decide(f"s * {token} web allow\n", "s", source, "web").action == "allow") == (qube in sources)


@pytest.mark.parametrize("token, targets", [
    ("web", {"web", f"uuid:{WEB.uuid}"}),                                  # match_strings
    ("@default", {"@default", "", "nosuch"}),                              # IntendedTarget.verify
    ("@adminvm", {"dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"}),  # is_dom0
    ("@anyvm", {"web", f"uuid:{WEB.uuid}", "@default", "", "nosuch", "@dispvm", "@dispvm:web-dvm", "work"}),
    ("@dispvm", {"@dispvm"}),                                              # DispVM.match
    ("@dispvm:web-dvm", {"@dispvm", "@dispvm:web-dvm"}),                   # DispVMTemplate.match
    ("@dispvm:@tag:dvm", {"@dispvm", "@dispvm:web-dvm"}),                  # DispVMTag.match
    ("@tag:trusted", {"work", "dom0", "uuid:00000000-0000-0000-0000-000000000000"}),  # TagVM.match
])
def test_target_tokens(token: str, targets: set[str]) -> None:
    """Rule.is_match: which requested targets a rule's target token matches (work's @dispvm is web-dvm)."""
    forms = ["web", f"uuid:{WEB.uuid}", "@default", "", "nosuch", "@dispvm", "@dispvm:web-dvm", "work", "dom0",
             "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"]
    line = f"s * work {token} ask\n"
    assert {t for t in forms if decide(line, "s", "work", t).lineno is not None} == targets


def test_default_resolves_to_the_redirect() -> None:
    """Allow.evaluate / Ask.evaluate: @default goes where target= says; allow without a target is refused."""
    assert decide("s * work @default allow target=web\n", "s", "work", "") == Decision("allow", 1, target="web")
    assert decide("s * work @default ask target=@adminvm default_target=@adminvm\n", "s", "work", "") == \
        Decision("ask", 1, targets=frozenset({"dom0"}), default_target="dom0")
    assert decide("s * work @anyvm allow\n", "s", "work", "@default").action == "deny"
    assert decide("s * work @anyvm allow\n", "s", "work", "@dispvm") == Decision("allow", 1, target="@dispvm:web-dvm")
    assert decide("s * personal @dispvm allow\n", "s", "personal", "@dispvm").action == "deny"  # no default_dispvm
    with pytest.raises(policy_eval.PolicySyntaxError):
        parse("s * work @default allow\n")


def test_ask_collects_targets() -> None:
    """AbstractPolicy.collect_targets_for_ask: rules last to first, a deny removes, the caller is out."""
    lines = "s * work dom0 deny\ns * work @tag:trusted ask default_target=web\ns * @anyvm web ask\n"
    assert decide(lines, "s", "work", "web") == Decision("ask", 3, targets=frozenset({"web"}), default_target=None)
    assert decide("s * @anyvm @anyvm ask default_target=web\n", "s", "work", "web").targets == \
        {"web", "evil", "personal", "disp123", "web-dvm", "@dispvm:web-dvm"}


def test_autostart_no() -> None:
    """Allow.evaluate / Ask.evaluate with autostart=no: only running qubes and dom0 (allow_no_autostart)."""
    assert decide("s * work @anyvm allow autostart=no\n", "s", "work", "web").action == "allow"
    assert decide("s * work @anyvm allow autostart=no\n", "s", "work", "web-dvm").action == "deny"
    assert decide("s * work * allow autostart=no\n", "s", "work", "dom0").target == "dom0"
    assert decide("s * work @dispvm:web-dvm ask target=@dispvm:web-dvm autostart=no\n", "s", "work",
                  "@dispvm:web-dvm").action == "deny"


def test_a_request_for_no_template_is_refused() -> None:
    """IntendedTarget.verify (DispVMTemplate.verify): @dispvm:X must name a disposable template."""
    assert decide("s * work * allow\n", "s", "work", "@dispvm:work").reason == "not a template for dispvm: work"


def test_a_key_deny_holds_at_default_for_a_declared_argument_key_that_routes() -> None:
    """A key denies evil; its declared ``NAME+a`` key routes @default for a tag evil lacks.  evil's
    @default call to ``NAME+a`` meets the key's deny, narrowed to ``+a``, before any broader
    rule in a later policy file (here one that would allow it)."""
    text = ("version: 1\nforwards:\n  my.Svc:\n    target: unix:/run/qubes/a.sock\n"
            "    policy: {allow: [personal], deny: [evil]}\n"
            "  my.Svc+a:\n    target: unix:/run/qubes/b.sock\n"
            "    policy: {allow: ['@tag:trusted'], default_target: true}\n")
    ours = "\n".join(policy.lines(manifest.parse(text, "/m.yaml"), "web"))
    rules = parse(ours + "\nmy.Svc * @anyvm @default allow target=web\n")
    assert evaluate(rules, "my.Svc+a", "evil", "@default", QUBES).action == "deny"
    assert evaluate(rules, "my.Svc+a", "personal", "@default", QUBES).action == "deny"  # NAME's callers too
    assert evaluate(rules, "my.Svc+a", "work", "@default", QUBES).action == "allow"  # @tag:trusted
    assert evaluate(rules, "my.Svc+a", "disp123", "@default", QUBES).action == "allow"  # the later file's
