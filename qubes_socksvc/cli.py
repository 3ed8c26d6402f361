# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``qubes-socksvc``: check, apply, list/status, call, policy, features, serve.

Each verb imports only the wing it needs: ``serve`` and ``call`` never load
Jinja2, and ``serve`` pays for nothing but the runtime.
"""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .errors import SocksvcError

if TYPE_CHECKING:
    import argparse

    from . import install
    from .layout import Layout
    from .model import Manifest

DEFAULT_MANIFEST = "/etc/qubes-socksvc.yaml"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: The shell's code for a command ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def _load(path: str) -> Manifest:
    from .manifest import load

    return load(os.path.abspath(path))


def cmd_check(args: argparse.Namespace) -> int:
    from . import effective, render
    from .layout import Layout

    manifest = _load(args.config)
    services = sum(len(d.services) for d in manifest.daemons.values())
    layout = Layout.for_manifest(manifest)
    root = os.path.abspath(args.root)
    _, findings = effective.settle(manifest, layout, render.render(manifest, layout), root)
    now = effective.forgeable(manifest, root)
    for finding in findings:
        print(finding, file=sys.stderr)
    for finding in now:
        print(f"{finding} (on disk now)", file=sys.stderr)
    _explain_switches(manifest)
    if now:
        print(f"{manifest.path}: the disk as it is now lets callers forge their descriptors; "
              "fix the files named above (or apply, where it pins them)", file=sys.stderr)
    if any(f.conflict or f.forgeable for f in findings):
        print(f"{manifest.path}: valid, but apply would refuse it or leave it forgeable: calls would not get "
              "what it declares", file=sys.stderr)
        return EXIT_FAILED
    if now:
        return EXIT_FAILED
    print(f"{manifest.path}: OK, {len(manifest.daemons)} daemons, {services} services, "
          f"{len(manifest.forwards)} forwards")
    return EXIT_OK


def _explain_switches(manifest: Manifest) -> None:
    """Each daemon's Qubes switches (qubes_service, enable) in words: notes, and warnings on stderr."""
    from . import features

    for daemon in manifest.daemons.values():
        explained = features.explain(daemon)
        if explained is not None:
            text, warning = explained
            print(f"{'warning' if warning else 'note':9} {text}", file=sys.stderr if warning else sys.stdout)


def cmd_apply(args: argparse.Namespace) -> int:
    from . import effective, install, render
    from .layout import Layout

    manifest = _load(args.config)
    layout = Layout.for_manifest(manifest)
    root = os.path.abspath(args.root)
    with install.locked(optional=args.dry_run) as held:
        if not held:
            print(f"dry run without the apply lock (only root can take {install.LOCK_FILE}): "
                  "an apply running meanwhile may change what this plan shows", file=sys.stderr)
        artifacts, findings = effective.settle(manifest, layout, render.render(manifest, layout), root)
        plan = install.plan(artifacts, layout, root)
        if not plan.conflicts and not any(f.conflict for f in findings):
            ordered = effective.safe_order(plan, manifest)
            if isinstance(ordered, effective.Finding):
                findings.append(ordered)
            else:
                plan = ordered
        for action in plan.actions:
            if action.verb is not install.Verb.UNCHANGED or args.verbose:
                print(action)
        for finding in findings:
            print(finding, file=sys.stderr)
        conflicts = len(plan.conflicts) + sum(f.conflict for f in findings)
        if conflicts:
            print(f"{manifest.path}: {conflicts} conflicts; nothing was changed", file=sys.stderr)
            return EXIT_FAILED
        pending = len(plan.changes) + len(plan.sweeps)
        if args.dry_run:
            print(f"dry run: {pending} changes not made" if pending
                  else f"{manifest.path}: up to date, nothing to do")
            return EXIT_OK
        notes = _reload_notes(manifest, layout, root, plan)
        install.execute(plan)  # with no change, it only cleans up after an interrupted apply
    if not plan.changes:
        print(f"{manifest.path}: up to date, "
              + (f"{len(plan.sweeps)} leftovers swept" if plan.sweeps else "nothing to do"))
        return EXIT_OK
    print(f"{manifest.path}: applied {len(plan.changes)} changes")
    if any(a.path.startswith(layout.unit_dir + "/") for a in plan.changes):
        print("units changed: users run 'systemctl --user daemon-reload' (or log in again)")
    for note in notes:
        print(note)
    return EXIT_OK


def _reload_notes(manifest: Manifest, layout: Layout, root: str, plan: install.Plan) -> list[str]:
    """Per daemon whose spec changes: running daemons reload it at their next call, except for
    their sockets, which are systemd's (compared with the spec on disk before the write)."""
    from . import install, model

    notes = []
    for action in plan.changes:
        name = os.path.basename(action.path).removesuffix(".json")
        if os.path.dirname(action.path) != layout.spec_dir or name not in manifest.daemons:
            continue
        daemon = manifest.daemons[name]
        notes.append(f"daemon {name}: running daemons pick the new spec up at their next call")
        try:
            old = model.load(install.real_path(root, action.path)).daemon
        except model.SpecError:
            continue  # a new daemon, or a spec no daemon could have loaded
        if set(old.sockets()) != set(daemon.sockets()):
            notes.append(f"daemon {name}: its sockets changed: users run 'systemctl --user daemon-reload && "
                         f"systemctl --user restart {daemon.unit}.socket'")
    return notes


def cmd_list(args: argparse.Namespace) -> int:
    from . import status

    manifest = _load(args.config)
    text, forgeable = status.report(manifest, os.path.abspath(args.root))
    print(text, end="")
    return EXIT_FAILED if forgeable else EXIT_OK


def cmd_call(args: argparse.Namespace) -> int:
    from . import agent, lookup, qrexec
    from .descriptor import Descriptor

    service = args.service
    if not qrexec.is_service(service):
        raise agent.CallError(f"invalid service {service!r}; expected NAME, NAME+ or NAME+ARG "
                              "(NAME of [A-Za-z0-9_.-], ARG of [A-Za-z0-9_.+-])", EXIT_USAGE)
    if not qrexec.is_source(args.source):
        raise agent.CallError(f"invalid --source {args.source!r}; expected a qube name", EXIT_USAGE)
    name, argument = qrexec.split_service(service)
    if args.dom0:
        target = args.target.removeprefix("@")
        if not qrexec.is_target(target):
            raise agent.CallError(f"invalid --target {args.target!r}", EXIT_USAGE)
        desc = Descriptor(name, argument, args.source, args.target_type, target)
    else:
        desc = Descriptor(name, argument, args.source)
    if args.socket:
        entry = lookup.Entry(args.socket, service, lookup.Kind.SOCKET)
        skip = args.no_descriptor
    else:
        entry = agent.resolve(service, tuple(args.rpc_dir or qrexec.RPC_SEARCH_PATH))
        try:
            config = lookup.config_for(service, tuple(args.rpc_config_dir or qrexec.RPC_CONFIG_SEARCH_PATH))
        except lookup.LookupFailed as e:
            raise agent.CallError(str(e)) from e
        skip = args.no_descriptor or config.skip_service_descriptor
    if sys.stdout is None:  # started with standard output closed (>&-)
        raise agent.CallError("standard output is closed: the reply would have nowhere to go; "
                              "redirect it (>/dev/null to drop it)")
    sock = agent.connect(entry, service)
    if sys.stdin is None:  # started with no standard input at all: like qrexec, send none
        with open(os.devnull, "rb") as stdin:
            agent.call(sock, None if skip else desc.encode(), stdin, sys.stdout.buffer)
    else:
        agent.call(sock, None if skip else desc.encode(), sys.stdin.buffer, sys.stdout.buffer)
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    from . import policy

    manifest = _load(args.config)
    if args.qube is not None:
        qube, origin = args.qube, ""
    else:
        qube, origin = policy.default_qube()
        if origin != "qubesdb-read /name":
            print(f"qubes-socksvc policy: no qubesdb-read here; using the host name {qube!r} as this qube's "
                  "name (pass --qube NAME to be sure)", file=sys.stderr)
    try:
        text = policy.lines(manifest, qube, origin)
    except ValueError as e:
        raise SocksvcError(f"{e}; pass --qube NAME") from e
    print("\n".join(text))
    return EXIT_OK


def cmd_features(args: argparse.Namespace) -> int:
    from . import features

    if args.persistence is not None:
        mode, origin = args.persistence, "--persistence"
    else:
        mode, origin = features.persistence()
    if mode not in features.PERSISTENCE:
        print(f"qubes-socksvc features: persistence {mode!r} ({origin}): nothing here survives a restart, "
              "so nothing is announced", file=sys.stderr)
    announcement, problems = features.announce(os.path.abspath(args.root), mode)
    for line in (*problems, *announcement.refused):
        print(f"qubes-socksvc features: {line}", file=sys.stderr)
    for feature in announcement.features:
        print(feature)
    return EXIT_FAILED if problems else EXIT_OK


def _activation_fds() -> range:
    """The sockets systemd passed this process (sd_listen_fds(3): LISTEN_PID and LISTEN_FDS from 3)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return range(0)
    try:
        return range(3, 3 + int(os.environ.get("LISTEN_FDS", "0")))
    except ValueError:
        return range(0)


def _turn_away(fds: range) -> None:
    """A daemon that cannot serve closes the connections already waiting on its sockets.

    Otherwise systemd, whose socket still has them pending, starts it again at once, for as
    long as a caller waits (the service sets no start limit: systemd.unit(5)), and the caller
    hangs.  Each caller gets EOF: its call fails, and the daemon's log says why.
    """
    import socket

    turned = 0
    for fd in fds:
        try:
            listener = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with listener:
            listener.setblocking(False)
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:  # BlockingIOError: none left; anything else: not a listener
                    break
                connection.close()
                turned += 1
    if turned:
        logging.error("closed %d waiting calls: this daemon cannot serve (see above)", turned)


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.daemon)
    activated = _activation_fds()  # before anything consumes LISTEN_FDS
    if 0 in os.getresuid():  # a root real or saved UID lets a handler take root back
        logging.error("refusing to run as root: qrexec socket services run as a user; "
                      "enable the socket with 'systemctl --user enable --now qubes-socksvc-%s.socket'", args.daemon)
        _turn_away(activated)
        return EXIT_FAILED
    from . import model, server

    try:
        if args.spec is not None:
            spec_path = args.spec

            def load() -> tuple[model.Daemon, str]:
                spec = model.load(spec_path)
                if spec.daemon.name != args.daemon:
                    raise model.SpecError(f"{spec_path} is the spec of daemon {spec.daemon.name}, not {args.daemon}")
                return spec.daemon, spec.id

            source = server.Source(load, watch=spec_path)
        elif args.config is not None:  # development: validate the YAML here (imports PyYAML)
            manifest_path = args.config

            def load() -> tuple[model.Daemon, str]:
                manifest = _load(manifest_path)
                found = manifest.daemons.get(args.daemon)
                if found is None:
                    raise model.SpecError(f"{manifest.path}: no daemon {args.daemon!r}; declared: "
                                          f"{', '.join(manifest.daemons) or 'none'}")
                return found, manifest.sha256[:12]

            source = server.Source(load, watch=os.path.abspath(manifest_path))
        else:
            raise model.SpecError("give --spec SPEC (what the unit runs, written by apply) "
                                  "or -c MANIFEST (development)")
        daemon, spec_id = source.load()
        server.serve(daemon, bind_dir=args.bind_dir, source=source, spec_id=spec_id)
    except SocksvcError as e:  # SpecError, ServeError, or a manifest error with -c
        logging.error("%s", e)
        _turn_away(activated)
        return EXIT_FAILED
    return EXIT_OK


def _setup_logging(daemon: str) -> None:
    """Run by systemd (JOURNAL_STREAM set, systemd.exec(5)), log to the journal with fields, as
    native-protocol datagrams; otherwise to stderr.  Both write the line of each call without
    logging's generic path (logs.line)."""
    from . import logs

    level = logging.DEBUG if os.environ.get("QUBES_SOCKSVC_DEBUG") else logging.INFO
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        handler = logs.JournalLines(SYSLOG_IDENTIFIER="qubes-socksvc", DAEMON=daemon)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logs.StderrLines(f"qubes-socksvc[{daemon}]: ")
    logging.basicConfig(level=level, handlers=[handler])


def build_parser() -> argparse.ArgumentParser:
    import argparse  # not at the top: the unit's own command line never needs it (main)

    parser = argparse.ArgumentParser(
        prog="qubes-socksvc",
        description="qrexec socket services from one manifest: render units, qubes-rpc links and "
        "rpc-config (apply), and run the shared daemon (serve).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def add(name: str, help_: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_, description=help_, aliases=list(aliases))
        return sub

    def config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-c", "--config", default=DEFAULT_MANIFEST, metavar="MANIFEST",
                         help=f"the manifest (default {DEFAULT_MANIFEST}; "
                         "/usr/local/etc/qubes-socksvc.yaml renders under /usr/local)")

    sub = add("check", "validate the manifest and what qrexec would make of it once applied")
    config(sub)
    sub.add_argument("--root", default="/", metavar="DIR", help="judge this staging tree instead of /")
    sub.set_defaults(func=cmd_check)

    sub = add("apply", "render units, qubes-rpc symlinks and rpc-config files, atomically")
    config(sub)
    sub.add_argument("--root", default="/", metavar="DIR", help="write into this staging tree instead of /")
    sub.add_argument("--dry-run", action="store_true",
                     help="print the plan, change nothing (not root: without the apply lock)")
    sub.add_argument("-v", "--verbose", action="store_true", help="also list unchanged paths")
    sub.set_defaults(func=cmd_apply)

    sub = add("list", "show daemons, services, sockets and the state of each artifact", aliases=("status",))
    config(sub)
    sub.add_argument("--root", default="/", metavar="DIR", help="inspect this staging tree instead of /")
    sub.set_defaults(func=cmd_list)

    sub = add("call", "call a socket service like qrexec does: descriptor, stdin, half-close, stdout")
    sub.add_argument("service", metavar="SERVICE[+ARG]")
    sub.add_argument("--source", default="dom0", metavar="QUBE", help="the calling qube to claim (default dom0)")
    sub.add_argument("--dom0", action="store_true", help="send dom0's four-field descriptor")
    sub.add_argument("--target-type", choices=("name", "keyword"), default="name")
    sub.add_argument("--target", default="dom0", help="requested target (with --dom0); @keyword allowed")
    sub.add_argument("--socket", metavar="PATH", help="connect here instead of resolving the qubes-rpc path")
    sub.add_argument("--no-descriptor", action="store_true", help="send no descriptor (skip-service-descriptor)")
    sub.add_argument("--rpc-dir", action="append", metavar="DIR",
                     help="search this qubes-rpc directory instead (repeatable)")
    sub.add_argument("--rpc-config-dir", action="append", metavar="DIR",
                     help="search this rpc-config directory instead (repeatable)")
    sub.set_defaults(func=cmd_call)

    sub = add("policy", "print dom0's qrexec policy lines for every declared service and forward")
    config(sub)
    sub.add_argument("--qube", metavar="NAME",
                     help="this qube's name, the lines' target (default: qubesdb-read /name, else the host name; "
                     "dom0 -> @adminvm)")
    sub.set_defaults(func=cmd_policy)

    sub = add("features", "print the qvm-features-request lines that tell dom0 what apply installed "
              "(supported-rpc.NAME=1, supported-service.NAME=1); the post-install hook runs it")
    sub.add_argument("--root", default="/", metavar="DIR", help="read this staging tree instead of /")
    sub.add_argument("--persistence", metavar="MODE",
                     help="this qube's persistence: full (/etc's manifest), rw-only (/usr/local's), anything "
                     "else: none (default: qubesdb-read /qubes-vm-persistence; full if that fails)")
    sub.set_defaults(func=cmd_features)

    sub = add("serve", "run the shared daemon for one manifest daemon (started by systemd)")
    sub.add_argument("daemon", metavar="DAEMON")
    sub.add_argument("--spec", metavar="SPEC",
                     help="the compiled spec apply wrote (what the unit runs): "
                     "/var/lib/qubes-socksvc/daemons/DAEMON.json, or under /usr/local")
    sub.add_argument("-c", "--config", metavar="MANIFEST",
                     help="development: serve straight from a manifest (validated here), e.g. with --bind-dir")
    sub.add_argument("--bind-dir", metavar="DIR",
                     help="bind the sockets in DIR instead of using systemd's (debugging, tests)")
    sub.set_defaults(func=cmd_serve)
    return parser


def unit_command(argv: list[str]) -> argparse.Namespace | None:
    """The command line apply writes into every unit, ``serve DAEMON --spec SPEC``, parsed as
    argparse would parse it; None for anything else (argparse parses that).

    Run on every socket activation: argparse (and the gettext it loads) would cost 0.4 MiB of
    the idle daemon's memory and 7 ms of its start-up (bench figures 4 and 5).
    """
    if len(argv) == 4 and argv[0] == "serve" and argv[2] == "--spec" \
            and not argv[1].startswith("-") and not argv[3].startswith("-"):
        return SimpleNamespace(verb="serve", daemon=argv[1], spec=argv[3], config=None, bind_dir=None,  # type: ignore[return-value]
                               func=cmd_serve)
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = unit_command(argv) or build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SocksvcError as e:
        print(f"qubes-socksvc {args.verb}: {e}" if "\n" not in str(e) else e, file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"qubes-socksvc {args.verb}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"qubes-socksvc {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
