# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Manifest validation: every error names file:line:column and the key, and nothing is written."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from qubes_socksvc import manifest, model
from qubes_socksvc.manifest import ManifestError
from tests.conftest import REPO, apply, run_cli

GOOD = """\
version: 1
daemons:
  demo:
    services:
      demo.Echo:
        handler: qubes_socksvc.examples:echo
"""


def parse(text: str) -> model.Manifest:
    return manifest.parse(textwrap.dedent(text), "/etc/qubes-socksvc.yaml")


def test_defaults_follow_the_spec() -> None:
    daemon = parse(GOOD).daemons["demo"]
    assert daemon.socket == "/run/qubes/socksvc-demo.sock"
    assert (daemon.socket_mode, daemon.socket_group) == ("0660", "qubes")
    assert (daemon.condition_user, daemon.condition_group) == ("!root", "qubes")
    assert (daemon.idle_exit, daemon.max_connections, daemon.descriptor_timeout) == (300, 256, 10)
    assert (daemon.qubes_service, daemon.enable) == (None, False)
    service = daemon.services["demo.Echo"]
    assert service.service_descriptor is True
    assert service.rpc_config().options() == {}
    assert service.max_input == 1 << 20 and service.timeout == 0


def test_bundled_example_is_valid() -> None:
    parsed = manifest.load(str(REPO / "examples/qubes-socksvc.yaml"))
    assert set(parsed.daemons) == {"example", "raw"}
    raw = parsed.daemons["raw"].services["example.RawEcho"]
    assert raw.socket == "/run/qubes/socksvc-example.RawEcho.sock"
    assert raw.rpc_config().options() == {"skip-service-descriptor": True}


def test_shipped_manifest_declares_nothing() -> None:
    assert manifest.load(str(REPO / "etc/qubes-socksvc.yaml")).daemons == {}


# (manifest text, expected "line:col", expected key, expected words in the message)
BAD = {
    "unknown top key": ("version: 1\ndaemons: {}\nextra: 1\n", "3:1", "extra", "unknown key"),
    "wrong version": ("version: 2\ndaemons: {}\n", "1:10", "version", "expected 1"),
    "missing version": ("daemons: {}\n", "1:1", "version", "missing"),
    "unknown daemon key": (GOOD + "    sokcet: /run/qubes/x.sock\n", "7:5", "daemons.demo.sokcet", "unknown key"),
    "wrong type": (GOOD.replace("demo:\n", "demo:\n    idle_exit: soon\n"), "4:16", "daemons.demo.idle_exit",
                   "expected a number"),
    "bool is not int": (GOOD.replace("demo:\n", "demo:\n    max_connections: true\n"), "4:22",
                        "daemons.demo.max_connections", "expected an integer"),
    "bad daemon name": (GOOD.replace("  demo:", "  Demo/x:"), "3:3", "daemons.Demo/x", "invalid daemon name"),
    "service with slash": (GOOD.replace("demo.Echo:", "a/b:"), "5:7", "a/b", "invalid qrexec service name"),
    "service with dotdot": (GOOD.replace("demo.Echo:", "'..':"), "5:7", "..", "invalid qrexec service name"),
    "argument with dotdot path": (GOOD.replace("demo.Echo:", "demo.Echo+../x:"), "5:7", "demo.Echo+../x",
                                  "invalid qrexec service name"),
    "empty service": (GOOD.replace("demo.Echo:", "'':"), "5:7", "services.", "invalid qrexec service name"),
    "service too long": (GOOD.replace("demo.Echo:", "a" * 256 + ":"), "5:7", "services.aaa",
                         "at most 255 bytes"),
    "missing handler": (GOOD.replace("handler: qubes_socksvc.examples:echo", "timeout: 3"), "6:9",
                        "demo.Echo", 'missing "handler'),
    "bad handler": (GOOD.replace("qubes_socksvc.examples:echo", "not a handler"), "6:18",
                    "demo.Echo.handler", "module:callable"),
    "duplicate key": (GOOD + "      demo.Echo:\n        handler: a:b\n", "7:7", "demo.Echo", "duplicate key"),
    "duplicate service across daemons": (
        GOOD + "  other:\n    services:\n      demo.Echo:\n        handler: a:b\n", "9:7",
        "daemons.other.services.demo.Echo", "already declared by daemons.demo"),
    "duplicate socket": (
        GOOD + "  other:\n    socket: /run/qubes/socksvc-demo.sock\n    services:\n      o.X:\n        handler: a:b\n",
        "8:13", "daemons.other.socket", "already used"),
    "socket outside /run/qubes": (GOOD.replace("demo:\n", "demo:\n    socket: /etc/passwd.sock\n"), "4:13",
                                  "daemons.demo.socket", "/run/qubes/NAME.sock"),
    "socket path traversal": (GOOD.replace("demo:\n", "demo:\n    socket: /run/qubes/../x.sock\n"), "4:13",
                              "daemons.demo.socket", "normalised"),
    "world-accessible mode": (GOOD.replace("demo:\n", "demo:\n    socket_mode: '0666'\n"), "4:18",
                              "daemons.demo.socket_mode", "must not be accessible to others"),
    "raw service sharing the daemon socket": (
        GOOD + "      demo.Raw:\n        handler: a:b\n        service_descriptor: false\n"
        "        socket: /run/qubes/socksvc-demo.sock\n", "10:17", "demo.Raw.socket", "already used"),
    "socket on a descriptor service": (
        GOOD + "        socket: /run/qubes/own.sock\n", "6:9", "demo.Echo.socket",
        "only a service_descriptor: false service"),
    "force_user with skip-service-descriptor": (
        GOOD + "        force_user: user\n        service_descriptor: false\n", "6:9", "demo.Echo",
        "force_user cannot be combined"),
    "root daemon": (GOOD.replace("demo:\n", "demo:\n    condition_user: root\n"), "4:21",
                    "daemons.demo.condition_user", "refuses to run as root"),
    "daemon without services": ("version: 1\ndaemons:\n  demo: {socket_group: qubes}\n", "3:9", "daemons.demo",
                                'missing "services:"'),
    "daemon not a mapping": ("version: 1\ndaemons:\n  demo: 5\n", "3:9", "daemons.demo", "expected a mapping"),
    "key not a string": (GOOD.replace("demo:\n", "demo:\n    7: x\n"), "4:5", "daemons.demo",
                         "keys must be strings, got an integer"),
    "duplicate daemon key reported once": (GOOD.replace("demo:\n", "demo:\n    idle_exit: 1\n    idle_exit: 2\n"),
                                           "5:5", "daemons.demo.idle_exit", "duplicate key"),
    "not a mapping": ("version: 1\ndaemons: [a, b]\n", "2:10", "daemons", "expected a mapping"),
    "invalid yaml": ("version: 1\ndaemons: {a: [\n", "3:1", "", "invalid YAML"),
    "unterminated quote: where the problem is found": ("version: 1\ndaemons:\n  d: \"x\n", "4:1", "",
                                                      "invalid YAML: found unexpected end of stream"),
    "unclosed list: where the problem is found": ("version: 1\ndaemons: [a, b\nforwards: {}\n", "3:9", "",
                                                 "invalid YAML: did not find expected ',' or ']'"),
    "empty file": ("", "1:1", "", "manifest is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_error_names_file_line_column_and_key(case: str) -> None:
    text, position, key, words = BAD[case]
    with pytest.raises(ManifestError) as error:
        manifest.parse(text, "/srv/m.yaml")
    message = str(error.value)
    assert f"/srv/m.yaml:{position}:" in message, message
    assert key in message and words in message, message


def tree_digest(root: Path) -> str:
    """Every path, type, mode, content and link target below root."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest.update(f"{path.relative_to(root)} {st.st_mode:o}".encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_changes_nothing(case: str, tmp_path: Path) -> None:
    """check and apply exit 1, and an existing tree stays byte-for-byte the same."""
    root = tmp_path / "root"
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    apply(good, root, check=True)
    before = tree_digest(root)
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD[case][0])
    for verb in (["check"], ["apply", "--root", str(root)]):
        result = run_cli(*verb, "-c", str(bad))
        assert result.returncode == 1, result
        assert f"{bad}:" in result.stderr
        assert result.stdout == ""
    assert tree_digest(root) == before


def test_a_duplicate_key_is_reported_once() -> None:
    with pytest.raises(ManifestError) as error:
        parse(GOOD.replace("demo:\n", "demo:\n    idle_exit: 1\n    idle_exit: 2\n"))
    assert len(error.value.problems) == 1


def test_all_problems_are_reported_at_once() -> None:
    text = GOOD.replace("demo:\n", "demo:\n    idle_exit: x\n    socket_mode: '777'\n")
    with pytest.raises(ManifestError) as error:
        parse(text)
    assert len(error.value.problems) == 2


def test_every_problem_of_a_mapping_is_reported_past_the_first() -> None:
    """An unknown key, a bad argument or a bad caller does not hide the problems after it."""
    service = ("        sokcet: x\n        timeout: soon\n        policy:\n          allow: [work, '@bad']\n"
               "          ask: [mail, mail]\n          arguments:\n            'a b': {}\n            'c d': {}\n"
               "            ok: {deny: [x, x], notify: maybe}\n")
    with pytest.raises(ManifestError) as error:
        parse(GOOD + service)
    said = [problem.split(": ", 1)[1] for problem in error.value.problems]
    assert [s.split(":", 1)[0] for s in said] == [
        f"daemons.demo.services.demo.Echo.{key}" for key in (
            "sokcet", "timeout", "policy.allow", "policy.arguments.a b", "policy.arguments.c d",
            "policy.arguments.ok.notify", "policy.arguments.ok.deny", "policy.ask")], said


def test_a_daemon_with_a_problem_is_still_judged_against_the_other_entries() -> None:
    """All problems at once: a forward onto the socket of a daemon with a bad key is named too."""
    text = (GOOD.replace("demo:\n", "demo:\n    idle_exit: soon\n")
            + "forwards:\n  my.F:\n    target: unix:/run/qubes/socksvc-demo.sock\n")
    with pytest.raises(ManifestError) as error:
        parse(text)
    assert [problem.split(": ", 2)[1] for problem in error.value.problems] == [
        "daemons.demo.idle_exit", "forwards.my.F.target"], error.value.problems


def test_a_daemon_that_is_not_a_mapping_is_one_problem() -> None:
    with pytest.raises(ManifestError) as error:
        parse("version: 1\ndaemons:\n  demo: 5\n")
    assert len(error.value.problems) == 1 and "expected a mapping, got an integer" in error.value.problems[0]


def test_a_service_declared_twice_does_not_hide_the_services_after_it() -> None:
    text = GOOD + "  other:\n    services:\n      demo.Echo:\n        handler: a:b\n      o.X:\n        handler: 7\n"
    with pytest.raises(ManifestError) as error:
        parse(text)
    assert [problem.split(": ", 2)[1] for problem in error.value.problems] == [
        "daemons.other.services.demo.Echo", "daemons.other.services.o.X.handler"], error.value.problems


@pytest.mark.parametrize("extra", [0, 1])
def test_a_socket_path_is_at_most_what_a_unix_socket_address_holds(extra: int) -> None:
    """sun_path holds 108 bytes with its NUL: a daemon's socket of 107 bytes is taken, 108 refused;
    a service's default socket too long names the fix (set socket:)."""
    path = "/run/qubes/" + "s" * (model.MAX_SOCKET_PATH - len("/run/qubes/.sock") + extra) + ".sock"
    text = GOOD.replace("demo:\n", f"demo:\n    socket: {path}\n")
    if not extra:
        assert len(path) == model.MAX_SOCKET_PATH and parse(text).daemons["demo"].socket == path
        return
    with pytest.raises(ManifestError, match=f"daemons.demo.socket: longer than {model.MAX_SOCKET_PATH} bytes"):
        parse(text)
    raw = "r." + "R" * 100
    with pytest.raises(ManifestError, match=f"the default socket /run/qubes/socksvc-{raw}.sock is longer than "
                                            f"{model.MAX_SOCKET_PATH} bytes.*set socket: to a shorter path"):
        parse(GOOD + f"      {raw}:\n        handler: a:b\n        service_descriptor: false\n")


def test_unreadable_manifest(tmp_path: Path) -> None:
    result = run_cli("check", "-c", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert "missing.yaml: cannot read manifest" in result.stderr


def test_check_summary(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(GOOD)
    result = run_cli("check", "-c", str(path), check=True)
    assert result.stdout == f"{path}: OK, 1 daemons, 1 services, 0 forwards\n"


# --- work bounded like bytes: YAML aliases (issue 22.4) ---------------------------------------------

def alias_manifest(size: int) -> str:
    """One anchored 1000-caller policy, and as many services using it (``*callers``) as fit in ``size``."""
    callers = ", ".join(f"q{i:04d}" for i in range(1000))
    head = (f"version: 1\ndaemons:\n  d:\n    services:\n      s.S00000:\n        handler: a:b\n"
            f"        policy: &callers\n          allow: [{callers}]\n")
    entries = []
    total = len(head)
    for i in range(1, 100000):
        entry = f"      s.S{i:05d}:\n        handler: a:b\n        policy: *callers\n"
        if total + len(entry) > size:
            break
        entries.append(entry)
        total += len(entry)
    return head + "".join(entries)


def test_an_alias_manifest_at_the_size_cap_is_refused_at_once(tmp_path: Path) -> None:
    """Each alias stands for its anchor's whole value: 1 MiB of them is ~20 000 copies of a
    1000-caller policy, 20 million callers for check, apply and policy to walk (0.5 MiB took
    ``check`` 100 s).  Aliases are refused while parsing, before anything is built
    (manifest._check_events), each at its FILE:LINE:COLUMN, with the fix."""
    text = alias_manifest(manifest.MAX_MANIFEST_SIZE)
    assert manifest.MAX_MANIFEST_SIZE - 100 < len(text.encode()) <= manifest.MAX_MANIFEST_SIZE
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    for verb in (["check"], ["policy", "--qube", "work"]):
        result = run_cli(*verb, "-c", str(path))
        assert result.returncode != 0
        lines = result.stderr.splitlines()
        assert f"{path}:11:17: alias *callers: " in lines[0] and "write the value out" in lines[0], lines[:3]
        # The first ten named (qubes-socksvc.yaml(5)), the others counted: not one line per alias.
        assert sum(": alias *callers: " in line for line in lines) == 10, lines[:12]
        assert f"and {text.count('*callers') - 10} more aliases" in result.stderr


@pytest.mark.parametrize("siblings", [0, 3])
@pytest.mark.parametrize("depth", [32, 33])
def test_a_manifest_is_nested_at_most_32_levels_deep(depth: int, siblings: int) -> None:
    """qubes-socksvc.yaml(5): nested at most 32 levels deep (the top-level mapping is the first),
    however many collections came and closed before."""
    before = "[[]], " * siblings
    text = "version: 1\ndaemons: [" + before + "[" * (depth - 2) + "]" * (depth - 1) + "\n"
    with pytest.raises(ManifestError) as error:
        parse(text)
    deeper = [p for p in error.value.problems if "nested deeper than 32 levels" in p]
    column = 11 + len(before) + depth - 3
    assert deeper == ([] if depth == 32 else [f"/etc/qubes-socksvc.yaml:2:{column}: nested deeper than 32 "
                                              "levels; a manifest needs at most 9"]), error.value.problems


@pytest.mark.parametrize("text", ["version: 1\ndaemons:\nforwards:\n", "version: 1\nforwards:\ndaemons:\n",
                                  "version: 1\ndaemons:\nforwards:\n  my.F:\n    target: tcp:127.0.0.1:22\n",
                                  "version: 1\nforwards:\ndaemons:\n  d:\n    services:\n      s.S:\n"
                                  "        handler: a:b\n"])
def test_an_empty_daemons_or_forwards_declares_nothing_and_the_other_is_still_read(text: str) -> None:
    parsed = parse(text)
    assert len(parsed.daemons) + len(parsed.forwards) == text.count("handler") + text.count("target")


def test_a_forward_and_a_service_of_one_name_clash_whichever_comes_first() -> None:
    text = ("version: 1\nforwards:\n  s.S:\n    target: tcp:127.0.0.1:22\n"
            "daemons:\n  d:\n    services:\n      s.S:\n        handler: a:b\n")
    with pytest.raises(ManifestError, match=r"daemons\.d\.services\.s\.S: service already declared by forwards"):
        parse(text)


def test_an_anchor_without_an_alias_is_plain_yaml() -> None:
    assert parse(GOOD.replace("handler:", "handler: &h")).daemons["demo"].services["demo.Echo"].handler == \
        "qubes_socksvc.examples:echo"


@pytest.mark.parametrize(("key", "written", "expected", "got"), [
    ("handler", "{a: b}", "a string", "a mapping"), ("handler", "[a]", "a string", "a list"),
    ("handler", "~", "a string", "null"), ("handler", "", "a string", "null"),
    ("handler", "yes", "a string", "a boolean"), ("handler", "Off", "a string", "a boolean"),
    ("handler", "12", "a string", "an integer"), ("handler", "0x1F", "a string", "an integer"),
    ("handler", "1.5", "a string", "a number"),
    ("timeout", "'3'", "a number", "a string"), ("timeout", "true", "a number", "a boolean"),
    ("service_descriptor", "'no'", "a boolean (true/false)", "a string"),
    ("service_descriptor", "!!bool y", "a boolean (true/false)", "a string"),
    ("max_input", "1.0", "an integer", "a number"),
])
def test_a_value_of_the_wrong_type_is_named_as_yaml_reads_it(key: str, written: str, expected: str,
                                                             got: str) -> None:
    """The error says what YAML read (YAML 1.1, as PyYAML: yes/Off booleans, 0x integers), so a
    maintainer sees why a value was refused: quoting, a missing value, a list for a scalar."""
    text = (GOOD.replace("qubes_socksvc.examples:echo", written) if key == "handler"
            else GOOD + f"        {key}: {written}\n")
    with pytest.raises(ManifestError) as error:
        manifest.parse(text, "/etc/qubes-socksvc.yaml")
    assert f"demo.Echo.{key}: expected {expected}, got {got}" in str(error.value), str(error.value)


@pytest.mark.parametrize("word", ["yes", "no", "true", "false", "on", "off"])
def test_each_yaml_11_boolean_is_read_as_pyyaml_reads_it(word: str) -> None:
    for written in (word, word.title(), word.upper()):
        service = parse(GOOD + f"        exit_on_client_eof: {written}\n").daemons["demo"].services["demo.Echo"]
        assert service.exit_on_client_eof is yaml.safe_load(written), written


@pytest.mark.parametrize(("key", "written", "expected"), [
    ("max_input", "017", "an integer"), ("max_input", "1:30", "an integer"),
    ("timeout", "1:30.5", "a number"), ("timeout", ".inf", "a number"),
])
def test_a_yaml_11_number_python_reads_otherwise_is_refused_not_guessed(key: str, written: str,
                                                                         expected: str) -> None:
    """YAML 1.1 reads 017 as octal 15 and 1:30 as 90 (base 60): a maintainer who meant 17 must
    not get 15, so such a number is refused, as the string it is."""
    with pytest.raises(ManifestError) as error:
        parse(GOOD + f"        {key}: {written}\n")
    assert f"demo.Echo.{key}: expected {expected}, got a string" in str(error.value)


@pytest.mark.parametrize("written", ["1:30", "017", "2026-12-07", ".inf"])
def test_a_string_field_takes_what_yaml_11_would_read_as_another_type_as_written(written: str) -> None:
    daemon = parse(GOOD.replace("demo:\n", f"demo:\n    description: {written}\n")).daemons["demo"]
    assert daemon.description == written


def test_yaml_11_scalars_are_read_as_pyyaml_reads_them() -> None:
    """Numbers with "_" and 0x/0o prefixes, on/off/yes/no booleans, as yaml.safe_load gives them."""
    text = GOOD + ("        max_input: 0x1_0\n        timeout: 1_0.5\n        exit_on_client_eof: on\n"
                   "        exit_on_service_eof: No\n        wait_for_session: ON\n")
    service = manifest.parse(text, "/etc/qubes-socksvc.yaml").daemons["demo"].services["demo.Echo"]
    loaded = yaml.safe_load(text)["daemons"]["demo"]["services"]["demo.Echo"]
    assert (service.max_input, service.timeout) == (loaded["max_input"], loaded["timeout"]) == (16, 10.5)
    assert (service.exit_on_client_eof, service.exit_on_service_eof, service.wait_for_session) == \
        (loaded["exit_on_client_eof"], loaded["exit_on_service_eof"], loaded["wait_for_session"]) == (True, False, True)
