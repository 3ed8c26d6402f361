# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Conformance with qrexec (qubes-core-qrexec 4.4.2): each row cites the qrexec source it encodes.

The daemon rows run against a real daemon over real sockets, with the descriptor
exactly as qrexec sends it: the part of its command after ``QUBESRPC ``, one NUL
(libqrexec/exec.c: find_qrexec_service).  The lookup rows apply a manifest into a
staging tree and let ``qubes-socksvc call`` resolve it like the agent does.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from qubes_socksvc import lookup, qrexec, rpcconfig
from tests.conftest import RunningDaemon, apply, run_cli, world_dir

MANIFEST = """\
version: 1
daemons:
  conf:
    idle_exit: 0
    services:
      conf.A:
        handler: handlers:via_name
      conf.A+x:
        handler: handlers:via_argument
      conf.B:
        handler: handlers:via_name
      conf.B+:
        handler: handlers:via_empty
      conf.Raw:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
      conf.Raw+x:
        handler: handlers:via_argument
"""

LONG_ARG = "a+" * 150  # 300 bytes: conf.A+LONG_ARG is longer than NAME_MAX
UUID = "uuid:0123abcd-0123-4567-89ab-0123456789ab"
MAX_SERVICE = "conf.A+" + "z" * (qrexec.MAX_SERVICE_NAME_LEN - len("conf.A+"))

# (descriptor without its NUL, the entry that must serve it or None for a rejection,
#  the argument the handler must see, the qrexec source of the rule)
ROWS = [
    (b"conf.A+fe80++1+22 work", "NAME", "'fe80++1+22'",
     "exec.c parse_qubes_rpc_command: split at the first '+', the argument keeps the rest"),
    (b"conf.A+x work", "NAME+ARG", "'x'", "exec.c find_qrexec_service: key 1 (NAME+ARG) before NAME"),
    (b"conf.A+y work", "NAME", "'y'", "exec.c find_qrexec_service: key 2 (NAME) when NAME+ARG has no file"),
    (b"conf.A work", "NAME", "None", "exec.c parse_qubes_rpc_command: a bare call, sent verbatim"),
    (b"conf.B work", "NAME+", "None", "exec.c parse_qubes_rpc_command: a bare call is looked up as NAME+ first"),
    (b"conf.B+ work", "NAME+", "''", "exec.c find_qrexec_service: NAME+ (daemon appends '+': qrexec-daemon.c)"),
    (b"conf.B+q work", "NAME", "'q'", "exec.c find_qrexec_service: NAME+ does not serve NAME+q"),
    (f"conf.A+{LONG_ARG} work".encode(), "NAME", repr(LONG_ARG),
     "exec.c find_file: a key longer than NAME_MAX cannot exist; NAME serves it with the whole argument"),
    (f"{MAX_SERVICE} work".encode(), "NAME", None, "qrexec.h MAX_SERVICE_NAME_LEN: 65000 bytes accepted"),
    (f"{MAX_SERVICE}z work".encode(), None, None, "exec.c parse_qubes_rpc_command: 'Command too long'"),
    (b"x" * 256 + b"+a work", None, None, "exec.c parse_qubes_rpc_command: NAME longer than NAME_MAX fails"),
    (b"+a work", None, None, "qrexec-daemon.c validate_service_name: no leading '+'"),
    (b"conf.A+a/b work", None, None, "qrexec-daemon.c sanitize_name(service, \"+\"): no '/' in an argument"),
    (b"conf.A+a\n work", None, None, "qrexec-daemon.c sanitize_name: no newline, even trailing"),
    (b"conf.A\n work", None, None, "qrexec-daemon.c sanitize_name: no trailing newline in NAME"),
    (b"conf.A+a work\n", None, None, "qrexec-daemon.c: the source is a qube name, no trailing newline"),
    (b"conf.A+a dom0 name work\n", None, None, "qrexec-daemon.c: the target is a qube name, no trailing newline"),
    (b"conf.A+x " + b"w" * 31, "NAME+ARG", "'x'", "policy: qube names up to 31 characters"),
    (b"conf.A+x " + b"w" * 32, None, None, "policy: a source longer than 31 characters is no qube"),
    (b"conf.A+x @adminvm", None, None, "qrexec-daemon.c: the source is a qube name, never a keyword"),
    (b"conf.A+x dom0 keyword dispvm:web", "NAME+ARG", "'x'",
     "qrexec-daemon.c: '@dispvm:web' arrives as keyword dispvm:web"),
    (b"conf.A+ dom0 keyword adminvm", "NAME", "''", "qrexec-daemon.c: '@adminvm' arrives as keyword adminvm"),
    (f"conf.A+ work name {UUID}".encode(), "NAME", "''", "qrexec_policy_exec.py: a target may be uuid:UUID"),
    (b"conf.A+ work name " + b"t" * 63, "NAME", "''", "qrexec_policy_daemon.py: targets up to 63 characters"),
    (b"conf.A+ work name " + b"t" * 64, None, None, "qrexec_policy_daemon.py: longer targets are refused"),
    (b"conf.A+ work name @dispvm", "NAME", "''", "qrexec-daemon.c sanitize_name(target, \"@:\")"),
    (b"conf.A+ work name a/b", None, None, "qrexec-daemon.c sanitize_name(target, \"@:\"): no '/'"),
    (b"conf.Raw work", None, None,
     "exec.c find_qrexec_service: conf.Raw's link is its own socket; named on the shared one, refused"),
    (b"conf.Raw+x work", "NAME+ARG", "'x'", "exec.c find_qrexec_service: conf.Raw+x's own link wins"),
]


@pytest.fixture(scope="module")
def conf_daemon() -> object:
    daemon = RunningDaemon(MANIFEST, "conf")
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("wire, served_by, argument, source",
                         ROWS, ids=[f"{i:02}-{row[3][:60]}" for i, row in enumerate(ROWS)])
def test_daemon_dispatch_follows_qrexec(conf_daemon: RunningDaemon, wire: bytes, served_by: str | None,
                                        argument: str | None, source: str) -> None:
    reply = conf_daemon.call(wire + b"\0", b"input that a handler would echo").decode()
    if served_by is None:
        assert reply == "", f"{source}: must be rejected, got {reply!r}"
        return
    service = wire.split(b" ")[0].decode()
    assert reply.startswith(f"via={served_by}\n"), f"{source}: {reply[:200]!r}"
    assert f"service={service}\n" in reply, source  # the descriptor's service, verbatim
    if argument is not None:
        assert f"argument={argument}\n" in reply, source
    assert conf_daemon.call(b"conf.A+x work\0").startswith(b"via=NAME+ARG")  # unharmed


# --- lookup and rpc-config over what apply writes ----------------------------------------


def staged(manifest: str, daemon: RunningDaemon | None = None,
           foreign: dict[str, str] | None = None) -> tuple[Path, int, str]:
    """Apply ``manifest`` into a fresh staging root holding ``foreign`` files first; with a
    daemon, re-point the links apply wrote at its bind dir.  (root, exit code, stderr)."""
    root = world_dir("socksvc-conformance-")
    for path, text in (foreign or {}).items():
        real = root / path.lstrip("/")
        real.parent.mkdir(parents=True, exist_ok=True)
        real.write_text(text)
    (root / "manifest.yaml").write_text(manifest)
    result = apply(root / "manifest.yaml", root)
    if daemon is not None and result.returncode == 0:
        for link in (root / "etc/qubes-rpc").iterdir():
            target = os.readlink(link)
            link.unlink()
            link.symlink_to(daemon.socket(os.path.basename(target)))
    return root, result.returncode, result.stderr


def staged_call(root: Path, service: str, data: bytes = b"", *args: str) -> tuple[int, str, str]:
    rpc = [d for sub in ("run/qubes-rpc", "usr/local/etc/qubes-rpc", "etc/qubes-rpc")
           for d in ("--rpc-dir", str(root / sub))]
    config = [d for sub in ("run/qubes/rpc-config", "usr/local/etc/qubes/rpc-config", "etc/qubes/rpc-config")
              for d in ("--rpc-config-dir", str(root / sub))]
    result = run_cli("call", service, *rpc, *config, *args, input=data)
    return result.returncode, result.stdout, result.stderr


def test_no_caller_can_forge_its_descriptor(conf_daemon: RunningDaemon) -> None:
    """exec.c load_service_config_raw looks rpc-config up on its own: conf.Raw+x would inherit
    conf.Raw's skip-service-descriptor=true and qrexec would pass the caller's raw stdin to the
    shared socket as the descriptor.  apply pins conf.Raw+x with an explicit config."""
    root, code, err = staged(MANIFEST, conf_daemon)
    try:
        assert code == 0, err
        config = root / "etc/qubes/rpc-config/conf.Raw+x"
        assert rpcconfig.parse(config.read_text()).options() == {"skip-service-descriptor": False}
        dirs = tuple(str(root / d) for d in ("run/qubes/rpc-config", "etc/qubes/rpc-config"))
        assert lookup.config_for("conf.Raw+x", dirs).skip_service_descriptor is False
        assert lookup.config_for("conf.Raw+y", dirs).skip_service_descriptor is True  # reaches conf.Raw
        code, out, err = staged_call(root, "conf.Raw+x", b"conf.A+ dom0 keyword adminvm\0", "--source", "work")
        assert code == 0, err
        assert "source='work'" in out and "dom0" not in out.split("target")[0]
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("foreign, words, refused", [
    ({"/run/qubes/rpc-config/conf.Raw+x": "skip-service-descriptor=true\n"},
     "calls of conf.Raw+x would take the rpc-config /run/qubes/rpc-config/conf.Raw+x", True),
    ({"/usr/local/etc/qubes/rpc-config/conf.A+y": "skip-service-descriptor=true\n"},
     "calls of conf.A+y reach conf.A but take the rpc-config", True),
    ({"/usr/local/etc/qubes/rpc-config/conf.B": "wait-for-session=true\n"},
     "conf.B+ARG (any ARG without a file of its own) would take", True),
    ({"/run/qubes/rpc-config/conf.A+x": "wait-for-session=maybe\n"}, "qrexec would fail calls of conf.A+x", False),
])
def test_apply_refuses_what_a_foreign_rpc_config_would_change(foreign: dict[str, str], words: str,
                                                              refused: bool) -> None:
    """exec.c load_service_config_raw: the first file of key 1, then key 2, in every directory.
    A volatile file in /run that forges nothing is a warning (effective.py: group qubes writes
    there; refusing would protect nothing); one that would make a new link forgeable is not."""
    root, code, err = staged(MANIFEST, foreign=foreign)
    try:
        assert words in err, err
        if refused:
            assert code == 1 and "nothing was changed" in err, err
            assert not (root / "etc").exists()
        else:
            assert code == 0 and f"warning   conf.A+x: {words}" in err, err
        check = run_cli("check", "-c", str(root / "manifest.yaml"), "--root", str(root))
        assert check.returncode == int(refused) and words in check.stderr
    finally:
        shutil.rmtree(root)


def test_foreign_service_file_that_shadows_ours_is_reported() -> None:
    """exec.c find_qrexec_service: /run/qubes-rpc is searched before /etc/qubes-rpc."""
    foreign = {"/run/qubes-rpc/conf.A+x": "#!/bin/sh\n", "/usr/local/etc/qubes-rpc/conf.B+": "#!/bin/sh\n"}
    root, code, err = staged(MANIFEST, foreign=foreign)
    try:
        assert code == 0, err
        assert "warning   conf.A+x: calls of conf.A+x reach /run/qubes-rpc/conf.A+x" in err
        assert "warning   conf.B+: calls of conf.B+ reach /usr/local/etc/qubes-rpc/conf.B+" in err
        listing = run_cli("list", "-c", str(root / "manifest.yaml"), "--root", str(root)).stdout
        assert "calls of conf.A+x reach /run/qubes-rpc/conf.A+x" in listing
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("key, accepted, source", [
    ("conf.A+fe80++1+22", True, "exec.c parse_qubes_rpc_command: '+' inside the argument"),
    ("conf.A+", True, "exec.c parse_qubes_rpc_command: NAME+ is a key of its own"),
    ("a" * 250 + "+bcde", True, "exec.c find_file: 255 bytes can be looked up"),
    ("a" * 250 + "+bcdef", False, "exec.c find_file: 256 bytes can never be looked up"),
    ("conf.A+a/b", False, "qrexec-daemon.c sanitize_name: no '/'"),
    ("conf.A\n", False, "qrexec-daemon.c sanitize_name: no newline"),
    ("+x", False, "qrexec-daemon.c validate_service_name: no leading '+'"),
])
def test_manifest_keys_are_qubes_rpc_file_names(key: str, accepted: bool, source: str) -> None:
    manifest = f'version: 1\ndaemons:\n  k:\n    services:\n      "{key.encode("unicode_escape").decode()}":\n' \
               "        handler: handlers:fields\n"
    path = world_dir("socksvc-keys-") / "m.yaml"
    path.write_text(manifest)
    result = run_cli("check", "-c", str(path))
    assert (result.returncode == 0) == accepted, f"{source}: {result.stderr}"
    if not accepted and len(key) > 255 and "/" not in key:
        assert "qrexec never looks up a file name longer than 255" in result.stderr


@pytest.mark.parametrize("text, expected, source", [
    ("wait-for-session=true # comment\n", {"wait-for-session": True}, "toml.c: '#' after a value"),
    ("wait-for-session=1\n", {"wait-for-session": True}, "toml.c: wait-for-session takes 0/1"),
    ("wait-for-session = 0\n", {"wait-for-session": False}, "toml.c: spaces around '='"),
    ("skip-service-descriptor=true\t\nunknown-key='x'\n", {"skip-service-descriptor": True},
     "toml.c: unknown keys are ignored, trailing whitespace chopped"),
    ("force-user='user'\nskip-service-descriptor=false\n", {"force-user": "user", "skip-service-descriptor": False},
     "exec.c load_service_config_v2: force-user conflicts only with true"),
    ("wait-for-session=true\r\n", {"wait-for-session": True}, "toml.c: CR before LF is chopped"),
    (" wait-for-session=true\n", "expected a key at the start of the line",
     "toml.c: whitespace at the start of a line"),
    ("wait-for-session=2\n", "wait-for-session takes true, false, 0 or 1", "toml.c: integer > 1 for a boolean"),
    ("wait-for-session=01\n", "unexpected text after the value", "toml.c: junk after integer"),
    ('force-user="user"\n', "a 'single-quoted string'", "toml.c: double-quoted strings not implemented"),
    ("wait-for-session=true\nwait-for-session=false\n", "key wait-for-session already seen",
     "toml.c: key already seen"),
    ("skip-service-descriptor=1\n", "skip-service-descriptor takes true or false",
     "toml.c: Integer not valid for skip-service-descriptor"),
    ("force-user=true\n", "force-user takes a 'single-quoted' user name",
     "toml.c: Boolean not valid for user name or user ID"),
    ("wait-for-session=yes\n", "expected true, false, a decimal integer", "toml.c: unsupported start of value"),
    ("[section]\n", "expected a key at the start of the line", "toml.c: section headers not supported"),
    ("force-user='user'\nexit-on-client-eof=true\n", "force-user conflicts with exit-on-client-eof=true",
     "exec.c load_service_config_v2"),
    ("unknown=bare\n", "expected true, false, a decimal integer", "toml.c: an unknown key's value must still parse"),
    ("unknown=9\n", {}, "toml.c parse_toml_value: any decimal integer parses (then the key is ignored)"),
    ("force-user='user\n", "unterminated quoted string", "toml.c parse_toml_value: unterminated string"),
    ("wait-for-session=falsex\n", "unexpected text after the value", "toml.c: junk after a boolean"),
    ("wait-for-session=truex\n", "unexpected text after the value", "toml.c: junk after a boolean"),
    ("unknown=18446744073709551615\n", {}, "toml.c parse_toml_value: strtoull takes up to 2^64 - 1"),
    ("unknown=18446744073709551616\n", "integer out of range",
     "toml.c parse_toml_value: ERANGE beyond 2^64 - 1 fails the file"),
    ("wait-for-session=true\0\n", "NUL byte in line", "toml.c: NUL byte in line"),
    ("unknown=1\nwait-for-session=true\n", {"wait-for-session": True}, "toml.c: the lines after an unknown key count"),
    ("wait-for-session true\n", "missing '=' after key wait-for-session", "toml.c: Missing '=' after key"),
    ("wait-for-session=true\r", "unexpected text after the value",
     "toml.c qubes_toml_config_parse: CR is chopped only before LF; a last line without one keeps it"),
    ("wait-for-session=true\n  \n", "expected a key at the start of the line",
     "toml.c qubes_toml_config_parse: a line of spaces keeps its first one: whitespace at start of line"),
    ("force-user='user'#no space\n", {"force-user": "user"}, "toml.c parse_toml_value: '#' right after the quote"),
    ("force-user='user'x\n", "unexpected text after the value", "toml.c parse_toml_value: junk after the quote"),
    ("force-user=''\n", {"force-user": ""},
     "toml.c parse_toml_value: '' is empty (strchr from the byte after the quote)"),
    ("force-user='''user'''\n", "triple-quoted strings are not supported",
     "toml.c parse_toml_value: Triple-quoted strings not implemented"),
])
def test_rpc_config_parses_like_qrexec(text: str, expected: dict[str, object] | str, source: str) -> None:
    """A file qrexec refuses is refused for toml.c's reason (check and list report it to the admin)."""
    if isinstance(expected, str):
        with pytest.raises(rpcconfig.RpcConfigError, match=re.escape(expected)):
            rpcconfig.parse(text)
    else:
        assert rpcconfig.parse(text).options() == expected, source


@pytest.mark.parametrize("option", ["wait_for_session", "exit_on_client_eof", "exit_on_service_eof"])
def test_an_argument_service_keeps_qrexecs_default_against_its_names_option(option: str) -> None:
    """exec.c load_service_config_raw: pin.A+x, with no rpc-config of its own, would take pin.A's.
    Declared without the option, it must get qrexec's default, false (load_service_config_v2), so
    apply writes pin.A+x's file with the option set to false."""
    manifest = (f"version: 1\ndaemons:\n  p:\n    services:\n      pin.A:\n        handler: handlers:fields\n"
                f"        {option}: true\n      pin.A+x:\n        handler: handlers:fields\n")
    root, code, err = staged(manifest)
    try:
        assert code == 0, err
        key = option.replace("_", "-")
        assert rpcconfig.parse((root / "etc/qubes/rpc-config/pin.A").read_text()).options() == {key: True}
        assert rpcconfig.parse((root / "etc/qubes/rpc-config/pin.A+x").read_text()).options() == {key: False}
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize(("service", "keys", "source"), [
    ("a" * 250 + "+bcde", ("a" * 250 + "+bcde", "a" * 250), "exec.c find_file: a key of 255 bytes is looked up"),
    ("a" * 250 + "+bcdef", ("a" * 250,), "exec.c find_file: a key of 256 bytes cannot exist; NAME is tried"),
    ("conf.A", ("conf.A+", "conf.A"), "exec.c parse_qubes_rpc_command: a bare call tries NAME+ first"),
    ("a" * 255, ("a" * 255,), "exec.c find_file: a bare call of a 255-byte NAME: NAME+ (256 bytes) cannot exist"),
])
def test_lookup_keys_at_the_name_max_boundary(service: str, keys: tuple[str, ...], source: str) -> None:
    assert qrexec.lookup_keys(service) == keys, source
