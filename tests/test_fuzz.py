# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Property-based and fuzz tests of the two parsers that take untrusted or hand-written input.

- ``descriptor.parse`` reads bytes sent by another qube: any bytes give a
  Descriptor or a DescriptorError, quickly; what it accepts is exactly qrexec's
  character set and limits, re-encodes to the same bytes, and round-trips.
- ``manifest.parse``/``load`` read the administrator's YAML: any input gives a
  Manifest or a ManifestError (never another exception, never a crash), and a
  manifest that validates only renders paths inside its own directories.

The expected character sets are written out here again, independently of
``qrexec.py``, so a regression there is caught rather than mirrored.
Hypothesis runs derandomized with bounded examples, so CI is stable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from qubes_socksvc import descriptor, manifest, model, render
from qubes_socksvc.descriptor import Descriptor, DescriptorError
from qubes_socksvc.layout import Layout, Link
from qubes_socksvc.manifest import ManifestError
from tests.conftest import REPO, TESTS, run_cli

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=120)

# --- qrexec's rules, restated (SPEC.md section 1) ----------------------------------------
# (libqrexec/exec.c: parse_qubes_rpc_command; daemon/qrexec-daemon.c: sanitize_name;
# qrexec.h: MAX_SERVICE_NAME_LEN, MAX_QREXEC_CMD_LEN)
#: Unicode's surrogate category: not encodable as UTF-8, so never in a file or a descriptor.
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
DOMAIN_CHARS = NAME_CHARS + "@:"
SERVICE_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
ARGUMENT_RE = re.compile(r"[A-Za-z0-9_.+-]*\Z")
SOURCE_RE = re.compile(r"[A-Za-z0-9_.-]{1,31}\Z")
TARGET_RE = re.compile(r"[A-Za-z0-9_.@:-]{1,63}\Z")
MAX_COMMAND = 65535  # including the NUL
MAX_SERVICE = 65000
NAME_MAX = 255


def assert_within_qrexec_rules(d: Descriptor) -> None:
    assert SERVICE_RE.match(d.name) and len(d.name) <= NAME_MAX, d
    assert d.argument is None or ARGUMENT_RE.match(d.argument), d
    assert len(d.service.encode()) <= MAX_SERVICE, d
    assert SOURCE_RE.match(d.source), d
    assert (d.target_type is None) == (d.target is None), d
    if d.target_type is not None:
        assert d.target_type in ("name", "keyword"), d
        assert d.target is not None and TARGET_RE.match(d.target), d


def parse_or_none(data: bytes) -> Descriptor | None:
    """The only outcomes allowed: a Descriptor or a DescriptorError."""
    try:
        return descriptor.parse(data)
    except DescriptorError as e:
        assert "\0" not in str(e) and len(str(e)) < 200  # safe to log: no raw bytes echoed
        return None


# Descriptor-shaped bytes: words from a mix of valid and hostile alphabets, joined by
# spaces, so most examples get past the field split and exercise the name checks.
HOSTILE_BYTES = [b"/", b"..", b"+", b"\0", b"\n", b"\t", b"\x7f", b"\xff", b"\xc3\xa9", b"@", b":", b"%", b" ",
                 b"$", b"*", b"\\", b"'", b"\x1b[31m"]
word = st.lists(st.one_of(st.sampled_from([c.encode() for c in NAME_CHARS]), st.sampled_from(HOSTILE_BYTES)),
                max_size=40).map(b"".join)
descriptor_like = st.lists(word, min_size=1, max_size=5).map(b" ".join)
names = st.text(NAME_CHARS, min_size=1, max_size=60).filter(lambda n: n not in (".", ".."))
arguments = st.none() | st.text(NAME_CHARS + "+", max_size=60)
domains = st.text(NAME_CHARS, min_size=1, max_size=31)
targets = st.text(DOMAIN_CHARS, min_size=1, max_size=63)


@FUZZ
@given(st.binary(max_size=400))
@example(b"")
@example(b"\0")
@example(b" ")
@example(b"a b\0")
@example(b". src")
@example(b".. src")
@example(b"../etc/passwd src")
@example(b"a+../.. src")
@example(b"a/b src")
@example(b"a src\n")
@example(b"a src name")
@example(b"a src name b c")
@example(b"a src bogus b")
@example(b"a src keyword @dispvm")
@example(b"a+b+c src")
def test_arbitrary_bytes_give_a_descriptor_or_a_descriptor_error(data: bytes) -> None:
    parsed = parse_or_none(data)
    if parsed is not None:
        assert_within_qrexec_rules(parsed)
        assert parsed.encode() == data + b"\0"  # canonical: nothing was dropped or normalised


@FUZZ
@given(descriptor_like)
def test_descriptor_shaped_bytes_accepted_only_within_qrexec_rules(data: bytes) -> None:
    parsed = parse_or_none(data)
    if parsed is not None:
        assert_within_qrexec_rules(parsed)
        assert parsed.encode() == data + b"\0"


@FUZZ
@given(names, arguments, domains, st.none() | st.tuples(st.sampled_from(["name", "keyword"]), targets))
def test_valid_descriptors_round_trip(name: str, argument: str | None, source: str,
                                      target: tuple[str, str] | None) -> None:
    full = name if argument is None else f"{name}+{argument}"
    original = Descriptor(name, argument, source, *(target or (None, None)))
    wire = original.encode()
    assert wire.endswith(b"\0") and wire.count(b"\0") == 1
    assert descriptor.parse(wire[:-1]) == original
    assert descriptor.parse(wire[:-1]).service == full


@FUZZ
@given(names, arguments, domains, st.data())
def test_one_foreign_byte_anywhere_is_rejected(name: str, argument: str | None, source: str,
                                               data: st.DataObject) -> None:
    full = name if argument is None else f"{name}+{argument}"
    assume(len(full) <= NAME_MAX)
    wire = f"{full} {source}".encode()
    bad = data.draw(st.integers(0, 255).filter(
        lambda b: chr(b) not in DOMAIN_CHARS and chr(b) not in "+ ").map(lambda b: bytes([b])), label="bad")
    at = data.draw(st.integers(0, len(wire)), label="at")
    assert parse_or_none(wire[:at] + bad + wire[at:]) is None


@pytest.mark.parametrize("size", [1, 200, 254, 255, 256, 1000, 65000, 65001])
def test_service_name_length_limit(size: int) -> None:
    """NAME at most NAME_MAX, the whole service string at most MAX_SERVICE_NAME_LEN
    (libqrexec/exec.c: parse_qubes_rpc_command)."""
    accepted = parse_or_none(b"a" * size + b" work")
    assert (accepted is not None) == (size <= NAME_MAX)
    with_argument = parse_or_none(b"a+" + b"b" * (size - 2) + b" work") if size >= 2 else None
    if size >= 2:
        assert (with_argument is not None) == (size <= MAX_SERVICE)


@pytest.mark.parametrize("size", [31, 32, 63, 64])
def test_domain_name_length_limit(size: int) -> None:
    """Sources are qube names (31); requested targets up to 63 (qrexec_policy_daemon.py)."""
    assert (parse_or_none(b"a.B " + b"q" * size) is not None) == (size <= 31)
    assert (parse_or_none(b"a.B dom0 name " + b"q" * size) is not None) == (size <= 63)


def test_long_and_pathological_inputs_are_rejected_quickly() -> None:
    """Never hang: the worst inputs qrexec lets through are refused in linear time."""
    cases = [
        b"a" * (MAX_COMMAND - 1),                      # longest a descriptor can be, one field
        b"a" * 255 + b" " + b"b" * (MAX_COMMAND - 300),  # valid service, huge source
        b" " * (MAX_COMMAND - 1),
        b"a " * (MAX_COMMAND // 2 - 1),
        b"+" * (MAX_COMMAND - 1),
        b"\xff" * (MAX_COMMAND - 1),
        b"a" * 10_000_000,                              # far beyond the limit
    ]
    for case in cases:
        start = time.perf_counter()
        assert parse_or_none(case) is None
        assert time.perf_counter() - start < 0.5, f"{len(case)} bytes took too long"


# --- the manifest -------------------------------------------------------------------------

MANIFEST_PATH = "/etc/qubes-socksvc.yaml"
PROBLEM_RE = re.compile(r"/etc/qubes-socksvc\.yaml(:\d+:\d+)?: ")


def parse_manifest(text: str) -> model.Manifest | None:
    try:
        return manifest.parse(text, MANIFEST_PATH)
    except ManifestError as e:
        assert e.problems and all(PROBLEM_RE.match(p) for p in e.problems), e.problems
        return None


def assert_renders_inside_its_directories(parsed: model.Manifest) -> None:
    layout = Layout.for_manifest(parsed)
    allowed = {layout.unit_dir, layout.rpc_dir, layout.rpc_config_dir, layout.spec_dir}
    for artifact in render.render(parsed, layout, exec_start=["/usr/bin/python3", "-m", "qubes_socksvc"]):
        assert os.path.normpath(artifact.path) == artifact.path, artifact.path
        assert os.path.dirname(artifact.path) in allowed, artifact.path
        assert os.path.basename(artifact.path) not in ("", ".", ".."), artifact.path
        if isinstance(artifact, Link):
            assert re.fullmatch(r"/run/qubes/[A-Za-z0-9_.+-]+\.sock", artifact.target), artifact
    for daemon in parsed.daemons.values():
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", daemon.name)
        assert int(daemon.socket_mode, 8) & 0o007 == 0, daemon.socket_mode
        for full_name in daemon.services:
            name, _, argument = full_name.partition("+")
            assert SERVICE_RE.match(name) and name not in (".", "..") and ARGUMENT_RE.match(argument)
            assert len(full_name.encode()) <= NAME_MAX


@FUZZ
@given(st.text(st.characters(blacklist_categories=SURROGATES), max_size=300))
@example("")
@example("[" * 5000)  # deeper nesting is tested in a subprocess: a regression would crash pytest
@example("- " * 5000)
@example("&a [*a]")
@example("version: 1\ndaemons:\n  d: &x\n    services: {}\n  e: *x\n")
@example("version: !!binary AAAA\n")
@example("? [a]\n: b\n")
@example("\ufeffversion: 1\n")
@example("%YAML 1.1\n---\nversion: 1\n...\n---\nversion: 1\n")
def test_arbitrary_text_gives_a_manifest_or_a_manifest_error(text: str) -> None:
    parsed = parse_manifest(text)
    if parsed is not None:
        assert_renders_inside_its_directories(parsed)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_on_disk_give_a_manifest_or_a_manifest_error(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        f.write(data)
        f.flush()
        try:
            manifest.load(f.name)
        except ManifestError as e:
            assert all(p.startswith(f.name) for p in e.problems), e.problems


# Manifest-shaped YAML: the real keys with a mix of valid and hostile values, so most
# examples reach the schema checks instead of failing as YAML.
SCALARS = ["1", "0", "-1", "300", "1.5", "1e3", ".inf", ".nan", "true", "no", "null", "~", "''", '"0660"', '"0666"',
           '"0777"', "0660", '"/run/qubes/x.sock"', "/run/qubes/../etc/x.sock", "/etc/passwd", "/run/qubes/a/b.sock",
           '"qubes_socksvc.examples:echo"', "os:system", '"a:b"', "'a b'", "qubes", "'!root'", "root", "'%n'",
           "[]", "{}", "[1, 2]", "{a: 1}", '"\\0"', "'\u00e9'", "*a", "&a 1", "!!int x", "!!str 1"]
KEYS = [*manifest.DAEMON_FIELDS, *manifest.SERVICE_FIELDS, "services", "bogus"]
SERVICE_KEYS = ["a.Echo", "a.Echo+x", "a.Echo+", "../x", "a/b", ".", "..", "a+b+c", "+x", "a" * 256, "é", "a b",
                "'a:b'", "x" * 255, "A-b_c.d+e-F_g.h", "a.Raw"]
DAEMON_NAMES = ["d", "d2", "D", "-d", "d/e", "../d", "d" * 65, "d_e-f", "''"]

scalar = st.sampled_from(SCALARS)
fields = st.dictionaries(st.sampled_from(KEYS), scalar, max_size=4)
service_map = st.dictionaries(st.sampled_from(SERVICE_KEYS),
                              st.one_of(fields.map(lambda f: {"handler": '"qubes_socksvc.examples:echo"', **f}),
                                        scalar), max_size=4)


def _yaml(daemons: dict[str, tuple[dict[str, str], dict[str, dict[str, str] | str]]], version: str) -> str:
    lines = [f"version: {version}", "daemons:"]
    for name, (daemon_fields, services) in daemons.items():
        lines.append(f"  {name}:")
        lines += [f"    {k}: {v}" for k, v in daemon_fields.items() if k != "services"]
        lines.append("    services:")
        for service, body in services.items():
            if isinstance(body, str):
                lines.append(f"      {service}: {body}")
                continue
            lines.append(f"      {service}:")
            lines += [f"        {k}: {v}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


manifest_like = st.builds(
    _yaml,
    st.dictionaries(st.sampled_from(DAEMON_NAMES), st.tuples(fields, service_map), min_size=1, max_size=3),
    st.sampled_from(["1", "1", "1", "2", "'1'", "true"]),
)


@FUZZ
@given(manifest_like)
def test_manifest_shaped_yaml_validates_only_within_the_rules(text: str) -> None:
    parsed = parse_manifest(text)
    if parsed is not None:
        assert_renders_inside_its_directories(parsed)


@FEW
@given(st.lists(st.tuples(names, arguments), min_size=1, max_size=5, unique=True), st.booleans())
def test_valid_manifests_are_accepted_and_render_inside_their_directories(
        services: list[tuple[str, str | None]], local: bool) -> None:
    full_names = {n if a is None else f"{n}+{a}" for n, a in services}
    assume(all(len(f) <= NAME_MAX for f in full_names))
    body = "".join(f"      '{f}':\n        handler: qubes_socksvc.examples:echo\n" for f in sorted(full_names))
    text = f"version: 1\ndaemons:\n  d:\n    services:\n{body}"
    path = "/usr/local/etc/qubes-socksvc.yaml" if local else MANIFEST_PATH
    parsed = manifest.parse(text, path)
    assert set(parsed.daemons["d"].services) == full_names
    assert_renders_inside_its_directories(parsed)


def test_deep_nesting_is_a_manifest_error(tmp_path: Path) -> None:
    """Regression: libyaml's recursive composer crashed 'check' with SIGSEGV on ~50 000 levels."""
    for text in ("[" * 100_000 + "]" * 100_000, "{a: " * 60_000 + "1" + "}" * 60_000, "- " * 40 + "x\n"):
        path = tmp_path / "deep.yaml"
        path.write_text(text)
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 1, (result.returncode, result.stderr[-500:])
        assert "nested deeper than" in result.stderr and "Traceback" not in result.stderr


def test_deepest_legitimate_nesting_is_still_accepted() -> None:
    """The depth limit must not refuse a real manifest written in flow style."""
    text = "{version: 1, daemons: {d: {services: {a.B: {handler: 'qubes_socksvc.examples:echo'}}}}}"
    assert parse_manifest(text) is not None


# --- atheris (coverage-guided), when it is installed: bounded, in a subprocess ---------------

ATHERIS_HARNESS = textwrap.dedent("""\
    import sys, atheris
    with atheris.instrument_imports():
        from qubes_socksvc import descriptor, manifest
    def one(data):
        try:
            descriptor.parse(data)
        except descriptor.DescriptorError:
            pass
        try:
            manifest.parse(data.decode("utf-8", "replace"), "/f.yaml")
        except manifest.ManifestError:
            pass
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
""")


def test_atheris_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    harness = tmp_path / "fuzz_parsers.py"
    harness.write_text(ATHERIS_HARNESS)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate([b"my.Service+arg work name dom0", b"a b",
                              (REPO / "examples/qubes-socksvc.yaml").read_bytes()]):
        (corpus / f"seed{i}").write_bytes(seed)
    result = subprocess.run(
        [sys.executable, str(harness), "-runs=30000", "-max_total_time=20", "-seed=1", "-max_len=4096",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr, result.stderr[-3000:]
