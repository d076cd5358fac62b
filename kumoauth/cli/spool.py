"""
``kumoauth spool``: look at the queue and act on its messages.

    kumoauth spool --config etc/kumoauth.toml list [--json]
    kumoauth spool --config etc/kumoauth.toml show ID [--meta]
    kumoauth spool --config etc/kumoauth.toml flush
    kumoauth spool --config etc/kumoauth.toml retry|hold|release|delete|bounce ID
    kumoauth spool --config etc/kumoauth.toml retry|hold|release|delete --authn USER
    kumoauth spool --config etc/kumoauth.toml retry|hold|release|delete --from ADDRESS
    kumoauth spool --spool var/spool list

``list`` prints one line per message, oldest first: id, received time,
state (``queued``; ``deferred next=<time> attempts=N error="…"``;
``held``), ``authn=``, ``from=<…>``, ``to=`` each recipient with its status
(``pending``, ``done``, ``failed``) and the size.  ``--json`` prints one
JSON object per message and line instead.  ``show ID`` prints the message,
``show ID --meta`` its envelope with its delivery state (``"state"``).
Both only read (no lock), so they are safe while a server runs.

The actions (``flush``: every deferred message is due now; ``retry ID``;
``hold ID``; ``release ID``; ``delete ID``; ``bounce ID``: every
recipient still pending fails, with a bounce to the sender for those whose
RFC 3461 ``NOTIFY`` asks for failures (the default), and the message leaves
the queue) change the queue, which only the process holding its lock may do:

- **No server running** (the lock is free): the command takes the lock,
  applies the change (:func:`kumoauth.relay.service.apply`) and lets go at
  once.  ``bounce`` is refused then: it is sent through ``[relay]`` by the
  running service, so start it first.
- **A server running** (:class:`~kumoauth.relay.queue.QueueLocked`): the
  command leaves a request file in ``<spool>/control/``
  (:func:`kumoauth.relay.service.request`), which the server applies
  within a second.  With ``--wait SECONDS`` (the default, 5 s; more than
  0) it waits until the server has taken the request and reports what it
  shows in the queue; ``--no-wait`` leaves it and returns (``--wait 0`` is
  refused as wrong usage: it would not wait).  A request nobody took stays
  in ``control/`` and is applied by the next start (delete the file to
  cancel it).

An ID that is not 24 hex digits is refused before anything is touched; an
ID not in the queue is refused with one line (and no request is left).
With ``--authn USER`` or ``--from ADDRESS`` instead of an ID, the action
applies to every queued message of that user or envelope sender: one
request (:func:`kumoauth.relay.service.apply_many`), one line for all.
No message chosen (none of that user, or ``-`` with nothing on standard
input) is nothing to do: one line on stdout, exit status 0.

Exit status:

- 0: done (or, with ``--no-wait``, the request is left for the server);
- 1: an operator's mistake or an unusable spool, one line on stderr (bad
  or unknown ID, no such spool, configuration error, ``bounce`` without a
  running server or without ``[relay]``);
- 2: wrong usage (argparse; ``--wait 0`` too);
- 3: the request was left for the running server, which did not take it
  within ``--wait`` seconds (it is still in ``control/``: the line says
  which file), or took it but the queue does not show the change soon
  after (e.g. ``bounce`` to a server without ``[relay]``: its log says
  why).

``kumoauth-spool`` is an alias kept for existing scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kumoauth.config import Config, ConfigError, load
from kumoauth.relay import service
from kumoauth.relay.queue import (
    JOURNAL_RE,
    LOCK_NAME,
    SEG_DIR,
    Entry,
    QueueError,
    QueueLocked,
    QueueReader,
    QueueStore,
    give_queue,
    iso_time,
)
from kumoauth.storage import legacy
from kumoauth.storage.spool import Spool, is_id
from kumoauth.textsafe import IGNORABLE_RANGES, escape, field_value

EXIT_OK = 0
EXIT_ERROR = 1
#: the request is left for the running server, its effect not seen within --wait
EXIT_PENDING = 3

#: default seconds to wait for a running server to take a request
WAIT = 5.0
#: the longest --wait (a day)
MAX_WAIT = 86400.0
#: seconds between looks at control/ while waiting
POLL = 0.05
#: longest wait, once the server took a request, for the queue to show it
CONFIRM = 2.0

#: what each action on one message does, for --help
ACTIONS = {
    "retry": "make a deferred message due now",
    "hold": "keep a message from being relayed until released",
    "release": "let a held message be relayed again",
    "delete": "remove a message from the queue without sending it",
    "bounce": "fail a message now, with a bounce to its sender for the recipients whose "
    "NOTIFY asks for failures (needs the running service and [relay])",
}

#: longest address or identity shown in a list line
ADDRESS_LIMIT = 1024


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("spool", help="list, show and act on queued messages")
    configure(parser)


def configure(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="kumoauth TOML configuration (uses [spool] path)")
    where.add_argument("--spool", help="spool directory")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="one line per queued message, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="print one message")
    show.add_argument("id")
    show.add_argument(
        "--meta", action="store_true", help="print the envelope and delivery state as JSON"
    )

    waiting = argparse.ArgumentParser(add_help=False)
    group = waiting.add_mutually_exclusive_group()
    group.add_argument(
        "--wait",
        type=seconds,
        default=WAIT,
        metavar="SECONDS",
        help="with a server running, wait this long (more than 0, at most "
        f"{MAX_WAIT:g}) for it to take the request (default {WAIT:g})",
    )
    group.add_argument(
        "--no-wait",
        dest="wait",
        action="store_const",
        const=0.0,
        help="with a server running, leave the request and return",
    )
    sub.add_parser(
        "flush", parents=[waiting], help="make every deferred message due now (held ones stay)"
    )
    for name, text in ACTIONS.items():
        action = sub.add_parser(name, parents=[waiting], help=text)
        if name not in service.BULK:
            action.add_argument("id")
            continue
        # the ids stay out of the group: argparse counts an empty nargs="*"
        # as given, and would refuse --authn beside it (run() checks)
        action.add_argument(
            "id",
            nargs="*",
            default=None,
            metavar="ID",
            help="the message; several ids, or - to read them from standard input "
            "(kumoauth spool list | awk … | kumoauth spool delete -)",
        )
        which = action.add_mutually_exclusive_group()
        which.add_argument(
            "--authn", metavar="USER", help="every queued message of this user (authn_id)"
        )
        which.add_argument(
            "--from",
            dest="sender",
            metavar="ADDRESS",
            help="every queued message with this envelope sender ('' for the null sender)",
        )
    parser.set_defaults(run=run)


# --------------------------------------------------------------------------
# where the spool is


def seconds(text: str) -> float:
    """
    ``--wait``'s value: a finite number of seconds, more than 0.  Not 0:
    "wait 0 s" would return before any server could take the request, and
    some tools read 0 as "for ever"; ``--no-wait`` says which.
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: not a wait; use --no-wait to leave the request and return at once"
        )
    if not 0 < value <= MAX_WAIT:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text!r}: not a number of seconds more than 0, at most {MAX_WAIT:g}"
        )
    return value


def locate(args: argparse.Namespace) -> tuple[Path, Config | None]:
    """
    The spool directory the arguments name, and the configuration if
    ``--config`` was given.  ``CommandError`` if either is unusable.
    """
    from kumoauth.cli import CommandError

    cfg = None
    if args.config:
        try:
            cfg = load(args.config)
        except ConfigError as e:
            raise CommandError(str(e)) from None
        path = Path(cfg.spool.path)
    else:
        path = Path(args.spool)
    if not path.is_dir():
        why = "not a directory" if path.exists() else "no such spool directory"
        raise CommandError(f"{escape(str(path))}: {why}")
    waiting = legacy.count(path)
    if waiting:
        print(
            f"kumoauth spool: {waiting} message(s) in kumoauth 0.1's format (<id>.eml/<id>.json)"
            " are not in the queue yet: the service moves them in when it starts (so does a"
            " spool action other than list and show, with no server running)",
            file=sys.stderr,
        )
    elif cfg is None and not _is_queue(path):
        # A mistyped --spool must not turn some directory into a queue
        # (flush created its lock, journal and seg/ there, and said "0");
        # the [spool] path of a configuration is the service's own, which
        # may be empty before its first start.
        raise CommandError(
            f"{escape(str(path))}: not a kumoauth queue (no {SEG_DIR}/, {LOCK_NAME} or journal): "
            "give the service's [spool] path, or --config"
        )
    return path, cfg


def _owner_hint(path: Path) -> str:
    """What to do when this user may not change the queue: be its owner."""
    if os.access(path, os.W_OK | os.X_OK):
        return ""
    try:
        import pwd

        owner = pwd.getpwuid(path.stat().st_uid).pw_name
    except (OSError, KeyError):
        return " (this user may not change the queue: run the command as its owner)"
    return f" (the queue is {escape(owner)}'s: run the command as {escape(owner)}, or with sudo)"


def _is_queue(path: Path) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return True  # QueueStore.open says what is wrong
    return SEG_DIR in names or LOCK_NAME in names or any(JOURNAL_RE.match(n) for n in names)


def open_spool(args: argparse.Namespace) -> Spool:
    return Spool(locate(args)[0])


def check_id(mid: str) -> str:
    """*mid* as the queue spells it (lowercase); ``CommandError`` if it is no id."""
    from kumoauth.cli import CommandError

    if not is_id(mid.lower()):
        raise CommandError(f"{escape(mid)}: not a message id (24 hex digits)")
    return mid.lower()  # as a terminal or a spreadsheet may have changed it


# --------------------------------------------------------------------------
# describing a message


def state_of(entry: Entry, now: float) -> str:
    """``held``, ``deferred`` or ``queued``."""
    if entry.held:
        return "held"
    if entry.attempts or entry.next_attempt > now:
        return "deferred"
    return "queued"


def state_json(entry: Entry, now: float) -> dict[str, Any]:
    """An entry's delivery state, for ``--json`` and ``show --meta``."""
    return {
        "state": state_of(entry, now),
        "held": entry.held,
        "attempts": entry.attempts,
        "next_attempt": iso_time(entry.next_attempt) if entry.next_attempt else None,
        "last_error": entry.last_error,
        "recipients": entry.rcpt_status(),
    }


def state_text(entry: Entry, now: float) -> str:
    state = state_of(entry, now)
    if state != "deferred":
        return state
    text = f"deferred next={iso_time(entry.next_attempt)} attempts={entry.attempts}"
    if entry.last_error is not None:
        error = escape(entry.last_error).replace('"', '\\"')
        text += f' error="{error}"'
    return text


def list_line(mid: str, envelope: dict[str, Any], entry: Entry, now: float) -> str:
    meta = envelope.get("meta") or {}
    authn = meta.get("authn_id") if isinstance(meta, dict) else None
    # Quoted like the log's names when they hold a space, = or " (a quoted
    # local part), so a sender cannot write fields of its own into the line.
    statuses = entry.rcpt_status()
    rcpts = ",".join(f"{rcpt[:ADDRESS_LIMIT]}({status})" for rcpt, status in statuses.items())
    return (
        f"{mid}  {envelope.get('received_at') or entry.received_at}  "
        f"{state_text(entry, now)}  "
        f"authn={field_value(authn, ADDRESS_LIMIT) if authn else '-'}  "
        f"from={field_value('<' + entry.mail_from + '>', ADDRESS_LIMIT + 2)}  "
        f"to={field_value(rcpts, len(rcpts))}  "
        f"{entry.size} bytes"
    )


def list_json(mid: str, envelope: dict[str, Any], entry: Entry, now: float) -> str:
    meta = envelope.get("meta") or {}
    record = {
        "id": mid,
        "received_at": envelope.get("received_at") or entry.received_at,
        **state_json(entry, now),
        "authn_id": meta.get("authn_id") if isinstance(meta, dict) else None,
        "mail_from": entry.mail_from,
        "size": entry.size,
    }
    return json.dumps(record, ensure_ascii=True)  # no bidi override or ESC to a terminal


# --------------------------------------------------------------------------
# the commands


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return do_list(args)
    given = getattr(args, "id", None)
    if getattr(args, "authn", None) is not None or getattr(args, "sender", None) is not None:
        if given:
            from kumoauth.cli import CommandError

            raise CommandError(f"{args.action}: ids or --authn or --from, not both")
        return do_bulk(args, args.action)
    if isinstance(given, list):
        if len(given) != 1 or given == ["-"]:
            return do_ids(args, args.action, given)
        given = given[0]
    mid = check_id(given) if given is not None else None
    if args.action == "show":
        assert mid is not None
        return do_show(args, mid)
    return do_action(args, args.action, mid)


def do_list(args: argparse.Namespace) -> int:
    spool = open_spool(args)
    now = time.time()
    line = list_json if args.json else list_line
    out = sys.stdout
    try:
        for msg in spool:
            out.write(line(msg.id, msg.envelope, msg.entry, now) + "\n")
        out.flush()
    except BrokenPipeError:
        # `kumoauth spool list | head`: the reader has what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    except QueueError as e:
        from kumoauth.cli import CommandError

        raise CommandError(str(e)) from None
    return EXIT_OK


#: octets a terminal would act on: controls but tab, line feed and CR
_TERMINAL_UNSAFE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: characters a terminal would not show as themselves (less shows them as
#: <U+202E>): what shows as nothing (bidi controls among them), C1
#: controls, LINE and PARAGRAPH SEPARATOR, and C1 bytes that are not UTF-8
#: (surrogate escapes); C0 controls are the bytes' (_TERMINAL_UNSAFE)
_INVISIBLE = re.compile(f"[{IGNORABLE_RANGES}\x80-\x9f\u2028\u2029\udc80-\udc9f]")


def _shown(m: re.Match[str]) -> str:
    n = ord(m[0])
    if 0xDC80 <= n <= 0xDC9F:
        return f"\\x{n - 0xDC00:02x}"  # a C1 byte that is not UTF-8
    return f"<U+{n:04X}>"


def do_show(args: argparse.Namespace, mid: str) -> int:
    from kumoauth.cli import CommandError

    spool = open_spool(args)
    try:
        msg = spool.read(mid)
        if args.meta:
            envelope = dict(msg.envelope)
            envelope["state"] = state_json(msg.entry, time.time())
            # ASCII: an upstream's text or a client's name with a bidi
            # override or ESC reaches the terminal as \u202e, not raw.
            print(json.dumps(envelope, indent=2, ensure_ascii=True))
        else:
            data = msg.read_bytes()
            if sys.stdout.isatty():
                # As less does: a control a client wrote (ESC sequences,
                # BEL) shown, not obeyed, and so is what reorders or breaks
                # the text (bidi controls, LINE SEPARATOR); piped, the bytes
                # are the message's.
                data = _TERMINAL_UNSAFE.sub(lambda m: b"\\x%02x" % m[0][0], data)
                if not data.isascii():
                    text = data.decode("utf-8", "surrogateescape")
                    text = _INVISIBLE.sub(_shown, text)
                    data = text.encode("utf-8", "surrogateescape")
            sys.stdout.buffer.write(data)
    except KeyError:
        raise CommandError(f"no message {mid} in the queue") from None
    except QueueError as e:
        raise CommandError(str(e)) from None
    return EXIT_OK


def select(path: Path, authn: str | None, sender: str | None) -> tuple[list[str], str]:
    """
    The ids of the queued messages of user *authn* (compared as the
    throttles and limits compare users) or with envelope sender *sender*
    (case-insensitively), oldest first; and a label for the choice.
    """
    from kumoauth.cli import CommandError
    from kumoauth.cli.throttle import user_name
    from kumoauth.stores import fold_user

    try:
        entries = QueueReader(path).entries()
    except QueueError as e:
        raise CommandError(str(e)) from None
    if authn is not None:
        try:
            key = fold_user(user_name(authn))
        except ValueError as e:
            raise CommandError(str(e)) from None
        chosen = [e.id for e in entries if e.authn_id is not None and fold_user(e.authn_id) == key]
        return chosen, f"authn={field_value(authn, ADDRESS_LIMIT)}"
    assert sender is not None
    address = sender.strip().removeprefix("<").removesuffix(">").casefold()
    chosen = [e.id for e in entries if e.mail_from.casefold() == address]
    return chosen, f"from={field_value('<' + address + '>', ADDRESS_LIMIT + 2)}"


def do_bulk(args: argparse.Namespace, op: str) -> int:
    """
    ``hold|release|retry|delete --authn USER | --from ADDRESS``: one
    request for every message chosen, one line for them all (a phished
    account's queued spam is thousands of messages).
    """
    path, _ = locate(args)
    ids, label = select(path, args.authn, args.sender)
    if not ids:
        print(f"{op}: no queued message with {label}")
        return EXIT_OK
    return act(path, op, None, args.wait, many=(ids, label))


def do_ids(args: argparse.Namespace, op: str, given: list[str]) -> int:
    """
    ``hold|release|retry|delete ID ID…`` (or ``-``: the ids on standard
    input, one or more per line): one request for them all, one line, as
    for ``--authn`` (``postsuper -d -`` in Postfix's words).
    """
    from kumoauth.cli import CommandError

    if not given:
        raise CommandError(
            f"{op}: give a message id, several, - (standard input), --authn or --from"
        )
    words: list[str] = []
    for word in given:
        words.extend(sys.stdin.read().split() if word == "-" else [word])
    ids = list(dict.fromkeys(check_id(w) for w in words))
    # The spool is checked first, as for --authn: a wrong --spool or
    # --config is a mistake whether or not there is anything to do.
    path, _ = locate(args)
    if not ids:
        # `… list --json | jq … | kumoauth spool delete -` with nothing
        # chosen: nothing to do, as for --authn matching no message (and
        # xargs -r, postsuper -d -), not a mistake.
        print(f"{op}: no message id on standard input: nothing to do")
        return EXIT_OK
    return act(path, op, None, args.wait, many=(ids, "the ids given"))


def do_action(args: argparse.Namespace, op: str, mid: str | None) -> int:
    from kumoauth.cli import CommandError

    path, cfg = locate(args)
    if op == "bounce" and cfg is not None and cfg.relay is None:
        raise CommandError(
            "bounce needs [relay] (the bounce is sent through the upstream), "
            f"and {escape(str(args.config))} has none"
        )
    return act(path, op, mid, args.wait)


def act(
    path: Path, op: str, mid: str | None, wait: float, many: tuple[list[str], str] | None = None
) -> int:
    """
    Apply *op* to *mid*, or to each of *many*'s ids: at once when no server
    holds the queue, else through a request the server applies.
    """
    from kumoauth.cli import CommandError

    try:
        store = QueueStore.open(path)
    except QueueLocked:
        return leave_request(path, op, mid, wait, many)
    except QueueError as e:
        raise CommandError(str(e) + _owner_hint(path)) from None
    for level, text in store.take_notes():  # recovered as a start would: said as it would
        print(f"kumoauth spool: {level}: {text}", file=sys.stderr)
    try:
        if op == "bounce":
            raise CommandError(
                "bounce needs the running service (it sends the bounce through [relay]): "
                "no server holds the queue; start it, then bounce again"
            )
        try:
            if many is not None:
                what = service.apply_many(store, op, *many)
            else:
                what = service.apply(store, op, mid)
        except KeyError:
            raise CommandError(f"no message {mid} in the queue") from None
        except ValueError as e:
            raise CommandError(str(e)) from None
    finally:
        store.close()
        keep_owner(path)
    print(what)
    return EXIT_OK


def keep_owner(path: Path) -> None:
    """
    Run as root (``sudo kumoauth spool …``) with no server, the command
    opened the queue itself: what that created or rewrote (its lock, a
    journal, an imported segment) goes back to the queue directory's
    owner, the service user, who could not open the queue otherwise.
    """
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(path)
        if st.st_uid != 0:
            give_queue(path, st.st_uid, st.st_gid)
    except OSError as e:
        print(f"kumoauth spool: warning: {escape(str(path))}: {e.strerror or e}", file=sys.stderr)


def _owner(path: Path) -> str:
    """`` (pid N)`` of the lock's holder, if it wrote one."""
    try:
        pid = (path / "lock").read_text(errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def leave_request(
    path: Path, op: str, mid: str | None, wait: float, many: tuple[list[str], str] | None = None
) -> int:
    """
    A server holds the queue: leave *op* for it in ``control/`` and, for
    up to *wait* seconds, watch it being taken.
    """
    from kumoauth.cli import CommandError

    what = op if mid is None else f"{op} {mid}"
    if many is not None:
        what = f"{op} of {len(many[0])} message(s) with {many[1]}"
    elif mid is not None:
        try:
            QueueReader(path).read(mid)
        except KeyError:
            raise CommandError(f"no message {mid} in the queue") from None
        except QueueError as e:
            raise CommandError(str(e)) from None
    try:
        req = service.request(path, op, mid, answer=wait > 0, many=many)
    except OSError as e:
        raise CommandError(f"{path / service.CONTROL_DIR}: cannot leave the request: {e}") from None
    owner = _owner(path)
    if wait <= 0:
        print(f"{what}: queued for the running server{owner} ({req})")
        return EXIT_OK
    deadline = time.monotonic() + wait
    try:
        taken = _until(lambda: None if req.exists() else True, deadline)
    except KeyboardInterrupt:
        print(f"\n{what}: the request is still queued ({req})", file=sys.stderr)
        return EXIT_PENDING
    if taken is None:
        print(
            f"{what}: the running server{owner} has not taken the request within "
            f"{wait:g}s; it is still queued ({req}): delete that file to cancel it",
            file=sys.stderr,
        )
        return EXIT_PENDING
    answered = _answered(service.answer_path(req), max(deadline, time.monotonic() + CONFIRM))
    if answered is not None:
        # The server's own words: what it did, or why not (a delete of a
        # message the attempt under way delivered, say).
        done = " not done: " not in answered
        print(
            _with_taken(answered, f"(taken by the running server{owner})", mid),
            file=sys.stdout if done else sys.stderr,
        )
        return EXIT_OK if done else EXIT_PENDING
    line, seen = confirm(path, op, mid, owner)
    print(line, file=sys.stdout if seen else sys.stderr)
    return EXIT_OK if seen else EXIT_PENDING


def _with_taken(answered: str, taken: str, mid: str | None) -> str:
    """
    The server's *answered* with the note *taken*: after what was done
    (``ID is bounced (taken …): failed and out of the queue; …``), at the
    end when the answer says no more.
    """
    head, sep, rest = answered.partition(": ")
    if mid is not None and sep and head.startswith(f"{mid} is "):
        return f"{head} {taken}{sep}{rest}"
    return f"{answered} {taken}"


T = TypeVar("T")


def _until(probe: Callable[[], T | None], deadline: float, every: float = POLL) -> T | None:
    """What *probe* gives once it gives anything, asked every *every* s until *deadline*."""
    while (found := probe()) is None and time.monotonic() < deadline:
        time.sleep(every)
    return found


def _answered(answer: Path, deadline: float) -> str | None:
    """The running server's answer to a request, if it comes by *deadline*."""

    def read() -> str | None:
        try:
            return answer.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None

    text = _until(read, deadline)
    if text is None:
        return None
    with contextlib.suppress(OSError):
        answer.unlink()
    return text if text.isprintable() else escape(text)


def _shows(path: Path, op: str, mid: str) -> str | None:
    """What the queue shows of *op* on *mid* having been applied, if it does."""
    try:
        entry = QueueReader(path).get(mid)
    except KeyError:
        return f"{mid} has left the queue" if op in ("delete", "bounce", "retry") else None
    if op == "hold" and entry.held:
        return f"{mid} is held"
    if op == "release" and not entry.held:
        return f"{mid} is released"
    if op == "retry" and entry.next_attempt <= time.time():
        return f"{mid} is due now"
    return None


def confirm(path: Path, op: str, mid: str | None, owner: str) -> tuple[str, bool]:
    """
    The server took the request (it applies it just after): once the queue
    shows the change, say so; if it does not soon, point at its log.
    Returns the line and whether the change is seen.
    """
    taken = f"taken by the running server{owner}"
    if mid is None:
        return f"{op}: {taken}", True
    shown = _until(lambda: _shows(path, op, mid), time.monotonic() + CONFIRM, every=0.1)
    if shown is not None:
        return f"{shown} ({taken})", True
    return f"{op} {mid}: {taken}, but the queue does not show it: see its log", False


def main(argv: list[str] | None = None) -> int:
    """
    ``kumoauth-spool`` (the alias): ``kumoauth spool`` under its old name.
    """
    from kumoauth.cli import main as kumoauth_main

    return kumoauth_main(["spool", *(sys.argv[1:] if argv is None else argv)], prog="kumoauth")


if __name__ == "__main__":
    sys.exit(main())
