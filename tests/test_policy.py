# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``qubes-socksvc policy``: dom0 policy lines, checked against qrexec's policy grammar.

The grammar below is restated, independently of qubes_socksvc.policy, from
qubes-core-qrexec 4.4.2 ``qrexec/policy/parser.py`` (CI has no qrexec to import):
``AbstractParser.load_policy_file`` (comments, blank lines), ``Rule.from_line``
(whitespace split, at least 5 fields), ``validate_service_and_argument``,
``VMToken.__new__`` with the token classes that inherit ``Source``, ``Target`` and
``Redirect``, ``Action``, and ``Rule.__init__``'s parameter checks.  What the lines
mean is judged by ``tests/policy_eval.py`` (``AbstractPolicy.evaluate``, restated), here
for one manifest with every kind of entry, and in ``test_policy_eval.py`` for every
combination.
"""

from __future__ import annotations

import os
import re
import string
import textwrap
from pathlib import Path

import pytest

from qubes_socksvc import manifest, policy
from qubes_socksvc.manifest import ManifestError
from tests import policy_eval
from tests.conftest import run_cli

# --- qrexec/policy/parser.py, restated ------------------------------------------------------

#: qrexec/__init__.py: RPCNAME_ALLOWED_CHARSET.
RPCNAME_CHARS = frozenset(string.ascii_letters + string.digits + "+-._")
#: The @-tokens each column accepts: a token class is usable where it inherits Source,
#: Target or Redirect (WildcardVM "*", AdminVM, AnyVM, DefaultVM, TypeVM, TagVM, DispVM,
#: DispVMTemplate, DispVMTag); EXACT tokens, then PREFIX tokens (with a non-empty value
#: that does not start with "@", except for the longer "@dispvm:@tag:" prefix).
EXACT = {
    "source": {"*", "@adminvm", "@anyvm"},
    "target": {"*", "@adminvm", "@anyvm", "@default", "@dispvm"},
    "redirect": {"@adminvm", "@dispvm"},
}
PREFIXES = {
    "source": ("@type:", "@tag:", "@dispvm:@tag:", "@dispvm:"),
    "target": ("@type:", "@tag:", "@dispvm:@tag:", "@dispvm:"),
    "redirect": ("@dispvm:",),
}
#: Action keyword arguments (Allow.__init__, Ask.__init__, Deny.__init__).
PARAMS = {
    "allow": {"target", "user", "notify", "autostart"},
    "ask": {"target", "default_target", "user", "notify", "autostart"},
    "deny": {"notify"},
}


def token_ok(token: str, column: str) -> bool:
    """VMToken.__new__: a plain name (not "@..." nor "*") is taken as is; otherwise
    an exact or prefixed token of a class usable in this column."""
    if not token:
        return False
    if not (token.startswith("@") or token == "*"):
        return True
    if token in EXACT[column]:
        return True
    for prefix in PREFIXES[column]:
        if token.startswith(prefix):
            value = token[len(prefix):]
            if value and not value.startswith("@"):
                return True
    return False


def rule_problem(line: str) -> str | None:
    """Why qrexec's parser refuses one non-comment policy line, or None."""
    fields = line.split()
    if len(fields) < 5:
        return "wrong number of fields"
    service, argument, source, target, action, *params = fields
    if service != "*" and set(service) - (RPCNAME_CHARS - {"+"}):
        return "service contains invalid characters"
    if argument != "*":
        if set(argument) - RPCNAME_CHARS:
            return "argument contains invalid characters"
        if not argument.startswith("+"):
            return "argument does not start with +"
        if service == "*":
            return "only * argument allowed for * service"
    if not token_ok(source, "source"):
        return f"invalid source token {source!r}"
    if not token_ok(target, "target"):
        return f"invalid target token {target!r}"
    if action not in PARAMS:
        return f"invalid action: {action}"
    seen: dict[str, str] = {}
    for param in params:
        key, eq, value = param.partition("=")
        if not eq:
            return f"invalid action parameter syntax: {param!r}"
        if key in seen:
            return f"parameter given twice: {key!r}"
        if key not in PARAMS[action]:
            return f"invalid parameters for action {action}"
        if key in ("notify", "autostart") and value not in ("yes", "no"):
            return f"{key!r} can be only 'yes' or 'no'"
        if key in ("target", "default_target") and not token_ok(value, "redirect"):
            return f"invalid redirect token {value!r}"
        seen[key] = value
    if target == "@default" and action == "allow" and "target" not in seen:
        return "allow action for @default rule must specify target= option"
    return None


def rules(text: str) -> list[list[str]]:
    """AbstractParser.load_policy_file: strip, skip blank lines and "#" comments; every
    other line must be a valid rule (our output has no "!" directives)."""
    result = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        problem = rule_problem(line)
        assert problem is None, f"line {number}: {problem}: {raw}"
        result.append(line.split())
    return result


def decide(text: str, call: str, caller: str, target: str) -> list[str] | None:
    """The action and parameters of the line dom0 decides by (AbstractPolicy.find_matching_rule,
    restated in tests/policy_eval.py); None: no line matches (qrexec denies)."""
    decision = policy_eval.evaluate(policy_eval.parse(text), call, caller, target, QUBES)
    return None if decision.lineno is None else text.splitlines()[decision.lineno - 1].split()[4:]


def test_the_grammar_restatement_refuses_what_qrexec_refuses() -> None:
    """The checker can fail: each of these is a PolicySyntaxError in parser.py."""
    bad = [
        "svc * work",                                    # wrong number of fields
        "svc+x * work q allow",                          # + in the service
        "svc x work q allow",                            # argument does not start with +
        "svc +a/b work q allow",                         # invalid characters
        "* +x work q allow",                             # only * argument for * service
        "svc * @default q allow",                        # @default is no Source
        "svc * @dispvm q allow",                         # nor is @dispvm
        "svc * work @bogus allow",                       # no such token
        "svc * work @tag: allow",                        # empty prefix value
        "svc * work q permit",                           # invalid action
        "svc * work q allow notify=maybe",               # yes/no only
        "svc * work q deny target=q",                    # deny takes notify only
        "svc * work q allow default_target=q",           # only ask takes default_target
        "svc * work q allow target=@anyvm",              # @anyvm is no Redirect
        "svc * work @default allow",                     # allow @default needs target=
        "svc * work q allow autostart=no autostart=yes",  # given twice
    ]
    assert [line for line in bad if rule_problem(line) is None] == []
    assert rule_problem("svc +a+b @dispvm:@tag:t @dispvm:dvm ask target=@dispvm:dvm default_target=@adminvm") is None


# --- the output ------------------------------------------------------------------------------

EVERYTHING = """\
version: 1
daemons:
  notes:
    services:
      my.Notes:                          # NAME: every argument
        handler: qubes_socksvc.examples:echo
        policy:
          allow: [work]
          ask: ["@anyvm"]
          deny: ["@tag:untrusted"]
          default_target: true
          arguments:
            delete: {allow: work, deny: ["@anyvm"]}
            list: {allow: [personal, "@type:DispVM"], notify: true}
      my.Notes+admin:                    # NAME+ARG under a NAME that lets others in
        handler: qubes_socksvc.examples:echo
        policy: {allow: [vault]}
      my.Notes+:                         # NAME+ without a policy
        handler: qubes_socksvc.examples:echo
      my.Quiet:                          # no policy at all
        handler: qubes_socksvc.examples:echo
      my.Raw:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
        policy:
          ask: ["@tag:web", "uuid:01234567-89ab-cdef-0123-456789abcdef", "*"]
          autostart: false
forwards:
  my.Ssh:
    target: tcp:127.0.0.1:22
    policy: {allow: "@adminvm", notify: false}
  my.Port:
    target: tcp:127.0.0.1
    policy:
      arguments:
        "8080": {ask: [work]}
  my.ConnectTCP+10.0.0.1+443:
    target: "tcp:"
    policy: {allow: ["@tag:web"], default_target: true}
  my.Agent:
    target: unix:/run/user/1000/gnupg/S.gpg-agent
"""


def output(tmp_path: Path, text: str, *args: str) -> str:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    result = run_cli("policy", "-c", str(path), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_kind_of_entry_gives_lines_qrexec_parses(tmp_path: Path) -> None:
    text = output(tmp_path, EVERYTHING, "--qube", "notes")
    lines = rules(text)
    assert text.startswith(f"# qrexec policy for the services of qube notes, from {tmp_path / 'm.yaml'}\n")
    used = {token for rule in lines for token in rule}
    assert {"@anyvm", "@default", "@adminvm", "@tag:untrusted", "@type:DispVM", "@tag:web",
            "*", "+delete", "+admin", "+10.0.0.1+443", "target=notes",
            "default_target=notes", "notify=yes", "notify=no", "autostart=no", "ask", "allow", "deny"} <= used
    assert all(rule[3] in ("notes", "@default") for rule in lines)  # only ever this qube
    # Every declared key is named, with what serves it.
    for key in ("my.Notes", "my.Notes+admin", "my.Notes+", "my.Quiet", "my.Raw", "my.Ssh", "my.Port",
                "my.ConnectTCP+10.0.0.1+443", "my.Agent"):
        assert f"\n# {key}: " in text
    assert re.search(r"^#my\.Quiet\s+\*\s+@anyvm\s+notes\s+deny$", text, re.M)  # commented: nothing allowed
    assert "the argument picks the port" in text


QUBES = policy_eval.SystemInfo(policy_eval.Domain(name, f"{n:08x}-0000-4000-8000-{n:012x}", type=kind, tags=tags)
                               for n, (name, kind, tags) in enumerate([
                                   ("notes", "AppVM", ()), ("work", "AppVM", ()), ("personal", "AppVM", ()),
                                   ("vault", "AppVM", ()), ("shady", "AppVM", ("untrusted",)),
                                   ("disp123", "DispVM", ()), ("browser", "AppVM", ("web",))], 1))
WORK, PERSONAL, VAULT, SHADY, DISP = "work", "personal", "vault", "shady", "disp123"


@pytest.mark.parametrize("call, caller, target, expected", [
    ("my.Notes+add", WORK, "notes", ["allow"]),
    ("my.Notes+add", WORK, "@default", ["allow", "target=notes"]),
    ("my.Notes+add", PERSONAL, "notes", ["ask", "default_target=notes"]),
    ("my.Notes+add", SHADY, "notes", ["deny"]),                  # deny before @anyvm's ask
    ("my.Notes+delete", WORK, "notes", ["allow"]),
    ("my.Notes+delete", PERSONAL, "notes", ["deny"]),             # arguments: before the general rules
    ("my.Notes+list", PERSONAL, "notes", ["allow", "notify=yes"]),
    ("my.Notes+list", DISP, "notes", ["allow", "notify=yes"]),
    ("my.Notes+list", WORK, "notes", ["allow"]),                  # falls through to my.Notes's own rules
    ("my.Notes+admin", VAULT, "notes", ["allow"]),
    ("my.Notes+admin", WORK, "notes", ["deny"]),                  # my.Notes's callers do not reach +admin
    ("my.Notes+admin", PERSONAL, "@default", ["deny"]),
    ("my.Notes+", WORK, "notes", ["deny"]),                       # no policy: nothing allowed
    ("my.Quiet+", WORK, "notes", None),
    ("my.Raw+", WORK, "notes", ["ask", "default_target=notes", "autostart=no"]),
    ("my.Port+8080", WORK, "notes", ["ask", "default_target=notes"]),
    ("my.Port+22", WORK, "notes", None),                          # only the listed port
    ("my.ConnectTCP+10.0.0.1+443", "browser", "@default", ["allow", "target=notes"]),
    ("my.Notes+add", SHADY, "@default", ["deny"]),               # the deny holds for @default too
    ("my.Notes+delete", PERSONAL, "@default", ["deny"]),          # and inside arguments
    ("my.Notes+admin", "shady", "@default", ["deny"]),
    ("my.Agent+", WORK, "notes", None),
])
def test_the_lines_allow_exactly_what_the_manifest_says(tmp_path: Path, call: str, caller: str, target: str,
                                                        expected: list[str] | None) -> None:
    text = output(tmp_path, EVERYTHING, "--qube", "notes")
    rules(text)
    assert decide(text, call, caller, target) == expected


def test_exact_output_for_a_small_manifest(tmp_path: Path) -> None:
    text = output(tmp_path, """\
version: 1
forwards:
  my.Web:
    target: tcp:127.0.0.1:8080
    policy: {allow: [work], ask: ["@anyvm"], default_target: true}
  my.Db:
    target: unix:/run/postgresql/.s.PGSQL.5432
""", "--qube", "web")
    assert text == textwrap.dedent(f"""\
        # qrexec policy for the services of qube web, from {tmp_path / 'm.yaml'}
        # (generated by qubes-socksvc policy).
        # Review it, then install it in dom0, e.g. as /etc/qubes/policy.d/30-socksvc-web.policy;
        # the first matching line wins, so place it before any broader rules for these services.

        # my.Db: forward to unix:/run/postgresql/.s.PGSQL.5432
        # no policy: in the manifest, so no line allows my.Db
        #my.Db  *  @anyvm  web       deny

        # my.Web: forward to tcp:127.0.0.1:8080
        my.Web  *  work    web       allow
        my.Web  *  work    @default  allow  target=web
        my.Web  *  @anyvm  web       ask    default_target=web
        my.Web  *  @anyvm  @default  ask    target=web  default_target=web
        """)


def test_dom0_is_adminvm_and_bad_names_are_refused(tmp_path: Path) -> None:
    """qrexec/policy/parser.py: is_dom0: dom0 and @adminvm are the same target."""
    lines = rules(output(tmp_path, EVERYTHING, "--qube", "dom0"))
    assert {rule[3] for rule in lines} == {"@adminvm", "@default"}
    assert "target=@adminvm" in {p for rule in lines for p in rule[5:]}
    path = tmp_path / "m.yaml"
    result = run_cli("policy", "-c", str(path), "--qube", "no qube")
    assert result.returncode == 1 and "invalid qube name 'no qube'" in result.stderr


def test_this_qube_comes_from_qubesdb(tmp_path: Path) -> None:
    """In a qube, ``qubesdb-read /name`` names it (a stand-in here: there is no QubesDB)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qubesdb-read"
    fake.write_text('#!/bin/sh\n[ "$1" = /name ] && echo fromdb\n')
    fake.chmod(0o755)
    path = tmp_path / "m.yaml"
    path.write_text(EVERYTHING)
    result = run_cli("policy", "-c", str(path), env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("# qrexec policy for the services of qube fromdb (qubesdb-read /name)")
    without = run_cli("policy", "-c", str(path), env={"PATH": "/nonexistent"})
    assert "using the host name" in without.stderr and "(the host name)" in without.stdout


BAD_POLICIES = [
    ("policy: {allow: ['@default']}", "6:26", "policy.allow", "not a caller keyword"),
    ("policy: {allow: ['@dispvm']}", "6:26", "policy.allow", "not a caller keyword"),
    # parser.py: DispVMTemplate.match and DispVMTag.match compare targets only: as a deny, no one.
    ("policy: {deny: ['@dispvm:dvm']}", "6:25", "policy.deny", "matches no caller"),
    ("policy: {ask: ['@dispvm:@tag:t']}", "6:24", "policy.ask", "matches no caller"),
    ("policy: {ask: ['a b']}", "6:24", "policy.ask", "expected a qube name"),
    ("policy: {ask: ['@tag:']}", "6:24", "policy.ask", "expected @tag:NAME"),
    ("policy: {ask: ['uuid:X']}", "6:24", "policy.ask", "expected uuid:"),
    ("policy: {ask: [7]}", "6:24", "policy.ask", "got an integer"),
    ("policy: {allow: [work], deny: work}", "6:17", "policy.deny", "work is also listed under allow"),
    ("policy: {allow: [work], default_target: maybe}", "6:49", "policy.default_target", "expected a boolean"),
    ("policy: {permit: [work]}", "6:18", "policy.permit", "unknown key"),
    ("policy: {arguments: {'a/b': {allow: work}}}", "6:30", "policy.arguments.a/b", "expected an argument"),
    ("policy: {arguments: {x: {arguments: {}}}}", "6:34", "policy.arguments.x.arguments", "unknown key"),
    ("policy: [work]", "6:17", "policy", "expected a mapping"),
]


@pytest.mark.parametrize("entry, where, key, words", BAD_POLICIES, ids=[b[0] for b in BAD_POLICIES])
def test_bad_policy_entries_are_errors(entry: str, where: str, key: str, words: str) -> None:
    text = ("version: 1\ndaemons:\n  d:\n    services:\n      my.Svc:\n        "
            f"{entry}\n        handler: qubes_socksvc.examples:echo\n")
    with pytest.raises(ManifestError) as error:
        manifest.parse(text, "/m.yaml")
    assert len(error.value.problems) == 1, error.value.problems
    assert error.value.problems[0].startswith(f"/m.yaml:{where}: daemons.d.services.my.Svc.{key}: ")
    assert words in error.value.problems[0], error.value.problems[0]


def test_policy_arguments_belong_to_name_keys() -> None:
    text = """\
        version: 1
        forwards:
          my.F:
            target: tcp:127.0.0.1
            policy: {arguments: {'22': {allow: work}}}
          my.F+22:
            target: tcp:127.0.0.1
          my.G+x:
            target: unix:/run/g.sock
            policy: {arguments: {y: {allow: work}}}
          my.H+x:
            target: unix:/run/g.sock
            policy: {arguments: {z: {allow: work}}}
        """
    with pytest.raises(ManifestError) as error:
        manifest.parse(textwrap.dedent(text), "/m.yaml")
    assert error.value.problems == [
        "/m.yaml:5:26: forwards.my.F.policy.arguments.22: my.F+22 is declared as forwards.my.F+22: "
        "put its rules in that entry's policy",
        "/m.yaml:10:25: forwards.my.G+x.policy.arguments: only a NAME key has per-argument rules; my.G+x serves "
        "one argument: put them in its policy",
        "/m.yaml:13:25: forwards.my.H+x.policy.arguments: only a NAME key has per-argument rules; my.H+x serves "
        "one argument: put them in its policy",
    ]


def test_policy_entries_are_frozen_values() -> None:
    """Policies and forwards stay hashable values, arguments included; a service's policy is
    the manifest's (dom0's business), kept out of the runtime model the daemon loads."""
    parsed = manifest.parse(EVERYTHING, "/m.yaml")
    service = parsed.services()["my.Notes"][1]
    notes = parsed.policies["my.Notes"]
    assert dict(notes.arguments)["list"].notify is True and not hasattr(service, "policy")
    assert len({service, notes, *parsed.forwards.values()}) == 2 + len(parsed.forwards)


def test_policy_source_tokens_match_the_grammar() -> None:
    """Every caller the manifest accepts is a Source token to qrexec's parser."""
    accepted = ["work", "@anyvm", "@adminvm", "*", "@tag:a", "@type:AppVM", "uuid:01234567-89ab-cdef-0123-456789abcdef"]
    assert [t for t in accepted if policy.source_problem(t) or not token_ok(t, "source")] == []
    refused = ["@default", "@dispvm", "@tag:", "@dispvm:@tag:", "@nope", "a=b", "x" * 32, "", "@dispvm:dvm",
               "@dispvm:@tag:t"]  # the last two parse, but match no caller (DispVMTemplate.match)
    assert [t for t in refused if policy.source_problem(t) is None] == []


def test_a_deny_has_its_default_twin_where_a_grant_routes_default() -> None:
    """issue 21: ``evil`` calling ``@default`` met only the ``@anyvm @default`` allow (a request's
    @default matches only @default rules: DefaultVM has no match of its own; the first match wins)."""
    text = ("version: 1\nforwards:\n  my.Svc:\n    target: unix:/run/qubes/a.sock\n"
            "    policy: {allow: ['@anyvm'], deny: [evil, personal], default_target: true, "
            "arguments: {x: {deny: [vault]}}}\n  my.Other:\n    target: unix:/run/qubes/b.sock\n"
            "    policy: {allow: [work], deny: [evil], default_target: true}\n")
    assert [line for line in policy.lines(manifest.parse(text, "/m.yaml"), "web") if not line.startswith("#")] == [
        "",
        "my.Other  *   evil      web       deny",   # no @default twin: no line routes evil's @default here
        "my.Other  *   work      web       allow",
        "my.Other  *   work      @default  allow  target=web",
        "",
        "my.Svc    +x  vault     web       deny",
        "my.Svc    +x  vault     @default  deny",
        "my.Svc    *   evil      web       deny",
        "my.Svc    *   evil      @default  deny",
        "my.Svc    *   personal  web       deny",
        "my.Svc    *   personal  @default  deny",
        "my.Svc    *   @anyvm    web       allow",
        "my.Svc    *   @anyvm    @default  allow  target=web",
    ]


# --- bounded work (issue 22: a fresh adversary's manifests) ---------------------------------


def test_routed_summary_answers_as_the_pairwise_rule() -> None:
    """_Routed.may_share (one look-up per deny) says what _may_share_a_caller says against each
    routed caller, for every pair of tokens of every kind (it replaced a scan of every routed line
    for every deny: quadratic, 22 s for 4000 callers)."""
    import itertools

    tokens = ["*", "@anyvm", "@adminvm", "dom0", "work", "evil", "uuid:01234567-89ab-cdef-0123-456789abcdef",
              "uuid:00000000-0000-0000-0000-000000000000", "@tag:t", "@type:AppVM"]
    for size in range(3):
        for routed_tokens in itertools.combinations(tokens, size):
            summary = policy._Routed()
            for token in routed_tokens:
                summary.add(token)
            for token in tokens:
                expected = any(policy._may_share_a_caller(token, r) for r in routed_tokens)
                assert summary.may_share(token) == expected, (token, routed_tokens)


def adversary(arguments: int, denies: int) -> str:
    entries = ", ".join(f"a{j}: {{allow: [w]}}" for j in range(arguments))
    callers = ", ".join(f"q{i}" for i in range(denies))
    return (f"version: 1\nforwards:\n  my.Svc:\n    target: unix:/run/qubes/a.sock\n"
            f"    policy: {{allow: ['@anyvm'], deny: [{callers}], arguments: {{{entries}}}}}\n")


def test_a_policy_that_would_multiply_past_its_cap_is_refused_early() -> None:
    """A key's denies are repeated in each arguments entry that grants: 1000 x 1000 made a
    million lines (5.5 s, 535 MB, 32 MB printed; 2500 x 2500: 42 s, 3.3 GB).  The lines are
    counted as they come and the work stops at policy.MAX_LINES, with the fix named."""
    parsed = manifest.parse(adversary(1000, 1000), "/m.yaml")
    with pytest.raises(policy.PolicyTooLarge, match=f"more than {policy.MAX_LINES} lines.*name fewer callers"):
        policy.lines(parsed, "web")
    small = policy.lines(manifest.parse(adversary(20, 20), "/m.yaml"), "web")  # the same shape, small: written
    assert sum("  deny" in line for line in small) == 20 + 20 * 20


def test_many_denies_beside_routing_grants_take_linear_work() -> None:
    """K allows and K denies with default_target: each deny's @default twin is judged against a
    summary of the routing grants, not every routed line (K = 4000 took 22 s)."""
    callers = [f"q{i}" for i in range(4000)]
    text = (f"version: 1\nforwards:\n  my.Svc:\n    target: unix:/run/qubes/a.sock\n    policy: {{allow: "
            f"[{', '.join(callers[:2000])}], deny: [{', '.join(callers[2000:])}], default_target: true}}\n")
    out = policy.lines(manifest.parse(text, "/m.yaml"), "web")
    # Named denies share no caller with other named allows: no @default twin is needed.
    assert sum(line.split()[3:5] == ["@default", "deny"] for line in out if not line.startswith("#")) == 0
    assert sum(line.split()[3:5] == ["@default", "allow"] for line in out if not line.startswith("#")) == 2000


GOLDEN_MANIFEST = EVERYTHING.replace('"uuid:01234567-89ab-cdef-0123-456789abcdef"', "vault") + """\
  my.Connect:                            # tcp: with no host: the argument picks host and port
    target: "tcp:"
    policy: {ask: [work]}
  my.Closed:                             # a deny-only key
    target: unix:/run/qubes/closed.sock
    policy: {deny: ["@tag:untrusted"]}
  my.Closed+x:                           # NAME+ARG without a policy under a NAME that grants nothing
    target: unix:/run/qubes/closed-x.sock
"""


#: What ``qubes-socksvc policy --qube notes`` prints for GOLDEN_MANIFEST, exactly.  Kept here, not in
#: tests/golden/, whose every file test_render.py compares with the rendered units.
GOLDEN_POLICY = """\
# qrexec policy for the services of qube notes, from /m.yaml
# (generated by qubes-socksvc policy).
# Review it, then install it in dom0, e.g. as /etc/qubes/policy.d/30-socksvc-notes.policy;
# the first matching line wins, so place it before any broader rules for these services.

# my.Agent: forward to unix:/run/user/1000/gnupg/S.gpg-agent
# no policy: in the manifest, so no line allows my.Agent
#my.Agent      *              @anyvm          notes     deny

# my.Closed+x: forward to unix:/run/qubes/closed-x.sock
# no policy: in the manifest, so no line allows my.Closed+x
#my.Closed     +x             @anyvm          notes     deny

# my.Closed: forward to unix:/run/qubes/closed.sock
my.Closed      *              @tag:untrusted  notes     deny

# my.Connect: forward to tcp:; the argument picks the host and port: a * line allows any, policy.arguments lists some
my.Connect     *              work            notes     ask    default_target=notes

# my.ConnectTCP+10.0.0.1+443: forward to tcp:
my.ConnectTCP  +10.0.0.1+443  @tag:web        notes     allow
my.ConnectTCP  +10.0.0.1+443  @tag:web        @default  allow  target=notes

# my.Notes+: handler qubes_socksvc.examples:echo (daemon notes)
# no policy: in the manifest, so no line allows my.Notes+
# not my.Notes's callers, unless allowed above:
my.Notes       +              @anyvm          notes     deny
my.Notes       +              @anyvm          @default  deny
my.Notes       +              work            notes     deny
my.Notes       +              work            @default  deny

# my.Notes+admin: handler qubes_socksvc.examples:echo (daemon notes)
my.Notes       +admin         vault           notes     allow
# not my.Notes's callers, unless allowed above:
my.Notes       +admin         @anyvm          notes     deny
my.Notes       +admin         @anyvm          @default  deny
my.Notes       +admin         work            notes     deny
my.Notes       +admin         work            @default  deny

# my.Notes: handler qubes_socksvc.examples:echo (daemon notes)
my.Notes       +delete        work            notes     allow
my.Notes       +delete        work            @default  allow  target=notes
my.Notes       +delete        @tag:untrusted  notes     deny
my.Notes       +delete        @tag:untrusted  @default  deny
my.Notes       +delete        @anyvm          notes     deny
my.Notes       +delete        @anyvm          @default  deny
my.Notes       +list          personal        notes     allow  notify=yes
my.Notes       +list          personal        @default  allow  target=notes  notify=yes
my.Notes       +list          @tag:untrusted  notes     deny   notify=yes
my.Notes       +list          @tag:untrusted  @default  deny   notify=yes
my.Notes       +list          @type:DispVM    notes     allow  notify=yes
my.Notes       +list          @type:DispVM    @default  allow  target=notes  notify=yes
my.Notes       *              work            notes     allow
my.Notes       *              work            @default  allow  target=notes
my.Notes       *              @tag:untrusted  notes     deny
my.Notes       *              @tag:untrusted  @default  deny
my.Notes       *              @anyvm          notes     ask    default_target=notes
my.Notes       *              @anyvm          @default  ask    target=notes  default_target=notes

# my.Port: forward to tcp:127.0.0.1; the argument picks the port: a * line allows any, policy.arguments lists some
my.Port        +8080          work            notes     ask    default_target=notes

# my.Quiet: handler qubes_socksvc.examples:echo (daemon notes)
# no policy: in the manifest, so no line allows my.Quiet
#my.Quiet      *              @anyvm          notes     deny

# my.Raw: handler qubes_socksvc.examples:echo (daemon notes)
my.Raw         *              vault           notes     ask    default_target=notes  autostart=no
my.Raw         *              @tag:web        notes     ask    default_target=notes  autostart=no
my.Raw         *              *               notes     ask    default_target=notes  autostart=no

# my.Ssh: forward to tcp:127.0.0.1:22
my.Ssh         *              @adminvm        notes     allow  notify=no
"""


def test_golden_policy_text(tmp_path: Path) -> None:
    """The exact text an operator reviews before installing it in dom0, comments included, for a
    manifest with every kind of entry: services with allow, ask and deny, arguments entries, NAME+
    and NAME+ARG keys under a NAME that grants and under a deny-only NAME, forwards to tcp:, tcp:HOST,
    tcp:HOST:PORT and unix:."""
    text = output(tmp_path, GOLDEN_MANIFEST, "--qube", "notes")
    assert text == GOLDEN_POLICY.replace("/m.yaml", str(tmp_path / "m.yaml"), 1)


def test_exactly_max_lines_are_written_and_one_more_is_refused() -> None:
    """The bound is 100 000 lines, header and comments included: a forward allowing N callers
    is 4 header lines, a blank line, its comment and N lines."""
    def one_key(callers: int) -> str:
        return ("version: 1\nforwards:\n  my.Svc:\n    target: unix:/run/qubes/a.sock\n"
                f"    policy: {{allow: [{', '.join(f'q{i}' for i in range(callers))}]}}\n")
    assert len(policy.lines(manifest.parse(one_key(100_000 - 6), "/m.yaml"), "web")) == 100_000
    with pytest.raises(policy.PolicyTooLarge, match="more than 100000 lines"):
        policy.lines(manifest.parse(one_key(100_000 - 5), "/m.yaml"), "web")


def qubesdb_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qubesdb-read"
    fake.write_text(script)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


@pytest.mark.parametrize("script", [
    "#!/bin/sh\necho fromdb; exit 1\n",           # fails: what it printed is not a name
    "#!/bin/sh\nexit 0\n",                        # prints nothing
    "#!/bin/sh\necho '  '\n",                     # prints only blanks
    "#!/nonexistent/interpreter\n",               # cannot be run at all (OSError)
])
def test_a_failing_qubesdb_read_falls_back_to_the_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             script: str) -> None:
    import socket
    qubesdb_standin(tmp_path, monkeypatch, script)
    assert policy.default_qube() == (socket.gethostname().partition(".")[0], "the host name")


def test_qubesdb_read_names_this_qube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qubesdb_standin(tmp_path, monkeypatch, '#!/bin/sh\n[ "$1" = /name ] && echo fromdb\n')
    assert policy.default_qube() == ("fromdb", "qubesdb-read /name")


def test_without_qubesdb_read_nothing_is_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import subprocess

    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ran {args}")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", run)
    assert policy.default_qube() == (socket.gethostname().partition(".")[0], "the host name")
