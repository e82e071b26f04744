"""Program plumbing shared by the three programs: the command line, the output
streams and the log.

``netio.py`` is about sockets and threads; this module is about what a program does
with its command line and its standard output, the same way in ``reverse_proxy.py``,
``server.py`` and ``client.py``:

* ``ArgumentParser`` and the ``arg_*`` types: the assignment's single-dash options,
  usage errors with exit status 2 (PROTOCOL.md section 5), and the output options
  (``add_output_options``: ``-quiet``, ``-timestamps``, ``-log-format``).
* ``run(main)`` runs a program: it makes the streams safe, calls ``main()`` and ends
  the process with ``finish(status)``.
* ``setup_output(args)`` sends the log (the ``rproxy`` logger) to standard output,
  one line per record, as text or JSON.

Strategy: standard output is a sink the program does not control (a terminal, a
pipe into ``head``, a launcher that stopped reading). Whatever it does, the program
keeps working and its exit status still says how its work went:

* **Any encoding.** stdout and stderr escape what their encoding cannot show
  (``backslashreplace``: ``日本`` is written ``\\u65e5\\u672c`` on a latin-1 or ASCII
  terminal) instead of raising ``UnicodeEncodeError``. JSON lines are pure ASCII.
* **A closed output** (EPIPE: ``| head -n 1``, ``| true``). Python ignores SIGPIPE,
  so that a socket gets EPIPE errors instead of killing the process; this module
  handles EPIPE on stdout and stderr itself, in one place (``_stream_closed``): the
  closed descriptor is replaced by ``/dev/null`` (so no later write and no flush at
  exit fails again; the Python documentation's "Note on SIGPIPE"), and the program
  ends quietly with status 141 = 128 + SIGPIPE, what a shell reports for a process
  that a closed pipe ended. A listening program (proxy, server) is told through
  ``on_output_closed`` and stops gracefully, as on SIGTERM; the client, which writes
  in its main thread, ends at once (``SystemExit(141)``). A closed stdout is never
  reported as a network fault.
* **A slow or stuck output** (``| { head -n 1; sleep 1000; }``, a terminal paused
  with Ctrl-S). In the proxy and the server no thread that routes, registers, checks
  health or handles signals ever writes to stdout: ``logging.handlers.QueueHandler``
  puts each record in a bounded queue (``QUEUE_LINES``) without waiting, and one
  thread writes them. When the queue is full, records are dropped and counted, and
  once the writer gets through, it writes ``N log lines dropped``. ``finish`` gives
  the writer ``FINISH_WAIT`` seconds to write what is queued, then ends the process
  even if the writer is stuck in a write (``os._exit``: Python's own exit would flush
  stdout and block on the full pipe). The client's lines are its result: it writes
  them itself and waits for a slow terminal rather than drop them.

Threads (``setup_output(args, background=True)``, the proxy and the server):

* The log writer thread ``log-writer`` (a ``logging.handlers.QueueListener``) is the
  only thread that writes log lines to stdout. It takes records from the queue in
  order, formats each (``TextFormatter`` or ``JsonFormatter``) and writes and
  flushes it. On EPIPE it calls the ``on_output_closed`` callback, once.
* Every other thread logs through ``QueueHandler.enqueue``: ``put_nowait`` on the
  queue, or a count in ``DropCounter`` (its lock is held for an addition).
* The main thread writes to stderr only for the one-line diagnostic of a program
  that ends (usage errors, ``print_error``), and calls ``finish``.

Log lines (``-log-format``, ``-timestamps``, ``-quiet``):

* ``text`` (the default): each record's message as it is, the assignment's wording.
  With ``-timestamps`` each line starts with the time the record was made, ISO 8601
  in UTC with milliseconds, and one space: ``2026-11-30T02:20:48.123Z Running the
  reverse proxy on port 2100``.
* ``json``: one JSON object per line (ASCII, control characters escaped, so always
  one line): ``ts`` (as above), ``level`` (``info``, ``warning``, ``error``),
  ``event``, the event's fields, and ``message`` (the text line). Field values that
  JSON cannot carry are written as ``str(value)``.
* ``-quiet`` silences the per-packet lines (the ``rproxy.packets`` logger) in both.

Events: a record names its event with ``extra=cli.event(NAME, field=value, ...)``;
a record without one has the event ``log`` and no fields. The events and their
fields (payloads as ``protocol.show`` gives them, at most 64 characters, so that a
1 MiB payload does not make a 1 MiB log line):

* all: ``log`` (none), ``dropped`` {count}: log lines dropped (a slow stdout).
* proxy and server: ``listening`` {port}: the ready line; ``stopping``, ``stopped``.
* server: ``starting`` {id}, ``policy`` {policy}, ``connecting`` {proxy},
  ``unreachable`` {proxy, reason, retry_s}, ``registered`` {proxy, id, policy,
  heartbeat}, ``session_lost`` {proxy, reason, retry_s}, ``session_error`` {proxy,
  code, reason}, ``refused`` {proxy, reason}; per packet ``received`` {client,
  payload, peer}, ``answer`` {client, payload, peer} (``peer``: the data
  connection, from a proxy); ``bad_message`` {peer, reason},
  ``idle_timeout`` {peer}; ``sessions`` {sessions, answered} (SIGUSR1: each
  proxy's session state, DATA frames answered); ``nothing_to_reload`` (SIGHUP).
* proxy: ``front_tier`` {port}; ``limits`` {descriptors, max_conns}; ``limits_low``
  {descriptors, max_conns, room};
  ``registration_open``; ``registration_keyed`` {policies}; ``registry`` {policies}
  (SIGUSR1); ``registered`` {id, policy, port,
  address, heartbeat, weight, peer}; ``challenge`` {peer, id, policy}; ``refused``
  {peer, reason}; ``session_replaced``
  {id, peer, old_peer}; ``left``, ``server_up`` {id, policy, address};
  ``server_down``, ``server_dropped`` {id, policy, address, reason}; per packet
  ``received`` {client, policy, payload, peer}, ``forward`` {client, server, policy,
  payload}, ``answer`` {server, payload}, ``reply`` {client, payload};
  ``no_server``, ``upstream_failed`` {client, policy, reason, peer}; ``exhausted``
  {id, address, reason, frames}; ``bad_message``, ``bad_frame``,
  ``frame_too_large`` {peer, reason}; ``frame_timeout``, ``idle_timeout`` {peer}
  (and {unanswered} when frames waited for answers);
  ``connection_failed`` {peer, reason}; ``overloaded`` {peer, max_conns};
  ``accept_paused``, ``accept_failed`` {listener, reason}; ``keys_reloaded`` {file,
  added, removed, changed}; ``keys_kept`` {file, reason}; ``nothing_to_reload``
  (SIGHUP without -policy-keys); ``internal_error`` {where,
  error, reason}; the stats listener (``-stats``): ``stats_listening`` {url},
  ``stats_unavailable`` {path, error, reason} (no snapshot or answer could be
  made), ``stats_request_failed`` {peer, error, reason}.
* client: ``sent`` {payload, policy, proxy}, ``answer`` {server, payload, proxy},
  ``verified`` {server, payload, proxy}, ``wrong_hash`` {server, payload, expected,
  proxy}, ``error_answer`` {code, error, payload, proxy}, ``unexpected`` {type,
  payload, proxy} (``proxy``: the one the answer came through),
  ``failover`` {proxy, reason, packets}, ``summary`` {correct, packets}.
"""

import argparse
import errno
import json
import logging
import logging.handlers
import math
import os
import queue
import resource
import sys
import threading
import time

import netio
import protocol

log = logging.getLogger("rproxy")

# Exit status of a program whose stdout or stderr was closed: 128 + SIGPIPE (13),
# what a shell reports for a process ended by a closed pipe (bash's "128+n").
EXIT_CLOSED_OUTPUT = 128 + 13
# Exit status after Ctrl-C outside a signal handler: 128 + SIGINT, as a shell reports.
EXIT_INTERRUPTED = 128 + 2
# Log records that may wait for the writer: 10,000, about 1 MB of this project's
# ~100-byte lines, as Docker's non-blocking log mode buffers 1 MB
# (``max-buffer-size``, default 1m) and drops what does not fit.
QUEUE_LINES = 10000
# Seconds ``finish`` waits for the writer to write what is queued: the proxy drains
# its connections for up to 4 s of the 5 s allowed after SIGTERM (the fault-tolerance
# issue; ``ReverseProxy.stop``), and the log gets the last second.
FINISH_WAIT = 1.0
# The event of a record logged without one.
GENERIC_EVENT = "log"
# Keys of every JSON line, which an event's field does not overwrite.
RESERVED_KEYS = frozenset(("ts", "level", "event", "message"))


def descriptor_limit():
    """Raise this process's soft limit on open descriptors to its hard limit, as
    nginx's ``worker_rlimit_nofile`` and HAProxy (which sets it from ``maxconn``) do,
    and return the limit in force (int; a large number where there is no limit).

    A soft limit below the hard one only makes a busy program fail early: the
    default soft limit is often 1024 while the hard one is far higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


# --- Events and formatters (pure) ----------------------------------------------------

def event(name, **fields):
    """Name the event of a log record and give its fields, for ``extra=``::

        log.info("Listening on port %d", port, extra=cli.event("listening", port=port))

    Args:
        name: the event's stable name (str), e.g. ``"registered"``.
        **fields: its fields; any values (those JSON cannot carry become ``str``).
            A field named like a key of every JSON line (``ts``, ``level``,
            ``event``, ``message``) is written with ``_`` after its name.

    Returns:
        dict: ``{"event": name, "fields": fields}``, the ``extra`` of a log call.
    """
    return {"event": name, "fields": fields}


def iso_utc(seconds):
    """``seconds`` since the epoch (float) as ISO 8601 UTC with milliseconds:
    ``"2026-11-30T02:20:48.123Z"``."""
    millis = round(seconds * 1000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000))
            + f".{millis % 1000:03d}Z")


class TextFormatter(logging.Formatter):
    """A record as its message; with ``timestamps``, every line of it after the
    record's time (``iso_utc``) and a space."""

    def __init__(self, timestamps=False):
        super().__init__()
        self.timestamps = timestamps

    def format(self, record):
        text = record.getMessage()
        if not self.timestamps:
            return text
        stamp = iso_utc(record.created)
        return "\n".join(f"{stamp} {line}" for line in text.split("\n"))


def _plain(value):
    # A value json.dumps writes as strict JSON: NaN and infinities, and every type
    # JSON does not know, become their str().
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ``ts``, ``level``, ``event``, the event's
    fields, ``message``. ASCII only (``\\uXXXX`` escapes), so that it is one valid
    line on any stdout encoding."""

    def format(self, record):
        line = {"ts": iso_utc(record.created), "level": record.levelname.lower(),
                "event": getattr(record, "event", GENERIC_EVENT)}
        for key, value in getattr(record, "fields", {}).items():
            line[f"{key}_" if key in RESERVED_KEYS else key] = _plain(value)
        line["message"] = record.getMessage()
        return json.dumps(line)


class DropCounter:
    """Log records dropped since the writer last reported them. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0

    def add(self):
        """Count one dropped record."""
        with self._lock:
            self._count += 1

    def take(self):
        """Return the count (int) and start again from 0."""
        with self._lock:
            count, self._count = self._count, 0
            return count


def dropped_record(count):
    """The record that reports ``count`` dropped lines (event ``dropped``)."""
    return logging.makeLogRecord({
        "name": log.name, "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": "%d log lines dropped (standard output was not read fast enough)",
        "args": (count,), **event("dropped", count=count)})


# --- Streams --------------------------------------------------------------------------

class _Output:
    """What is known of this process's stdout and stderr; one per process."""

    def __init__(self):
        self.lock = threading.Lock()
        self.closed = False     # stdout or stderr was closed (EPIPE)
        self.on_closed = None   # callback of a listening program, or None
        self.notified = False   # on_closed was called
        self.writer = None      # the LogWriter, if the log is written by a thread
        self.failed = None      # (stream name, reason) of the first other write error

    def mark_failed(self, stream, reason):
        """Record that ``stream`` cannot be written (a full disk, EIO, a closed
        descriptor; EPIPE is ``mark_closed``'s): its descriptor goes to /dev/null, the
        program goes on, and ``finish`` says so and exits 1. Never raises."""
        _to_devnull(stream)
        name = "standard error" if stream is sys.stderr else "standard output"
        with self.lock:
            if self.failed is None:
                self.failed = (name, reason)

    def mark_closed(self, stream):
        """Point ``stream``'s descriptor at /dev/null, record the closing, and call
        ``on_closed`` the first time. Never raises."""
        _to_devnull(stream)
        with self.lock:
            self.closed = True
            callback = None if self.notified else self.on_closed
            self.notified = self.notified or callback is not None
        if callback is not None:
            callback()


_output = _Output()


def _to_devnull(stream):
    # Later writes to ``stream`` go nowhere, without an error. Never raises.
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _stream_closed(stream):
    # The one place that handles EPIPE on stdout and stderr (see the module
    # docstring): a listening program is told and stops gracefully; otherwise the
    # main thread ends the program now, and any other thread returns.
    _output.mark_closed(stream)
    if _output.on_closed is None and threading.current_thread() is threading.main_thread():
        raise SystemExit(EXIT_CLOSED_OUTPUT)


def configure_streams():
    """Make stdout and stderr escape what their encoding cannot show
    (``backslashreplace``). Call at start, before anything is printed.

    A program started with its stdout closed (``>&-``) gets /dev/null there (so that
    no socket takes descriptor 1 and receives its lines) and ends saying so, with
    status 1, as ``ls >&-`` does."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
        _output.mark_failed(sys.stdout, "it was closed when the program started")
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def write_text(stream, text):
    """Write ``text`` (str) to ``stream`` and flush it. EPIPE is handled as
    ``_stream_closed`` says (it may raise ``SystemExit(141)`` in the main thread)."""
    if stream is None:
        return
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        _stream_closed(stream)
    except OSError as exc:
        _output.mark_failed(stream, exc.strerror or str(exc))


def print_error(line):
    """Write one diagnostic line to stderr (plain text whatever ``-log-format``
    says: it is for the person who ran the program)."""
    write_text(sys.stderr, line + "\n")


def on_output_closed(callback):
    """Call ``callback()`` (no arguments) once when stdout or stderr turns out to be
    closed, from the thread that found it; at once if that already happened. A
    listening program passes what SIGTERM does (``signals.post(signal.SIGTERM)``)."""
    with _output.lock:
        _output.on_closed = callback
        call = _output.closed and not _output.notified
        _output.notified = _output.notified or call
    if call:
        callback()


# --- The log --------------------------------------------------------------------------

class LineHandler(logging.Handler):
    """Write each record as one line to ``stream``, flushed.

    Args:
        stream: a text stream (``sys.stdout``).
        closed: ``f(stream)`` called on EPIPE (it may raise ``SystemExit``); any
            other write error is recorded for ``finish`` (``_Output.mark_failed``).
    """

    def __init__(self, stream, closed):
        super().__init__()
        self.stream = stream
        self.closed = closed

    def emit(self, record):
        try:
            text = self.format(record) + "\n"
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.closed(self.stream)
        except OSError as exc:
            _output.mark_failed(self.stream, exc.strerror or str(exc))
        except Exception:
            self.handleError(record)


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """``QueueHandler`` that never waits: a record that finds the queue full is
    counted in ``drops`` (a ``DropCounter``) and dropped."""

    def __init__(self, log_queue, drops):
        super().__init__(log_queue)
        self.drops = drops

    def enqueue(self, record):
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.drops.add()


class LogWriter(logging.handlers.QueueListener):
    """The log writer thread: writes the queued records with ``handler`` and, after
    a record, reports the records dropped since (``dropped_record``).

    Args:
        log_queue: the ``queue.Queue`` that ``DroppingQueueHandler`` fills.
        handler: the ``LineHandler`` that writes.
        drops: the ``DropCounter`` of the ``DroppingQueueHandler``.
    """

    def __init__(self, log_queue, handler, drops):
        super().__init__(log_queue, handler)
        self.drops = drops

    def start(self):
        """Start the thread (named ``log-writer``, a daemon: ``drain`` ends it)."""
        self._thread = threading.Thread(target=self._monitor, name="log-writer", daemon=True)
        self._thread.start()

    def handle(self, record):
        super().handle(record)
        count = self.drops.take()
        if count:
            super().handle(dropped_record(count))

    def drain(self, timeout):
        """Let the thread write every queued record and end, for up to ``timeout``
        seconds. Returns True if it ended, False if it is stuck (in a write that
        blocks, or behind a queue that stays full)."""
        deadline = netio.Deadline(timeout)
        try:
            self.queue.put(self._sentinel, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(deadline.left())
        return not self._thread.is_alive()


def setup_output(args, background=True):
    """Send the ``rproxy`` logger to stdout as ``args`` say (``-log-format``,
    ``-timestamps``, ``-quiet``); an exception that escapes a thread is logged in
    one line, never as a traceback.

    Args:
        args: parsed arguments with ``log_format`` and ``timestamps`` (and
            ``quiet``, where the program has it).
        background: True (proxy, server): the log writer thread writes, and no
            other thread waits for stdout. False (client): the logging thread
            writes, and waits for a slow stdout.
    """
    configure_streams()
    sink = LineHandler(sys.stdout, _stream_closed)
    sink.setFormatter(JsonFormatter() if args.log_format == "json"
                      else TextFormatter(args.timestamps))
    handler = sink
    if background:
        drops = DropCounter()
        log_queue = queue.Queue(QUEUE_LINES)
        handler = DroppingQueueHandler(log_queue, drops)
        _output.writer = LogWriter(log_queue, sink, drops)
        _output.writer.start()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if getattr(args, "quiet", False):
        logging.getLogger("rproxy.packets").setLevel(logging.WARNING)
    # Handler errors other than EPIPE (handled above) must not print tracebacks.
    logging.raiseExceptions = False

    def one_line(hook_args):
        if hook_args.exc_type is not SystemExit:
            log.error("internal error in thread %s: %s: %s",
                      hook_args.thread.name if hook_args.thread else "?",
                      hook_args.exc_type.__name__, hook_args.exc_value)

    threading.excepthook = one_line


def say(line, event=None):
    """Log one line of a program's own output (the client's lines) at INFO, through
    the same path and format as every log line. ``event``: a ``cli.event(...)``."""
    log.info(line, extra=event)


# --- Running and ending a program ----------------------------------------------------

def finish(status):
    """End the process with ``status`` (int; 141 instead if stdout or stderr was
    closed; 1 instead of 0 if one of them could not be written, said on stderr),
    after the log writer wrote what is queued, for up to ``FINISH_WAIT`` seconds.
    Never returns.

    The process ends with ``os._exit``, once everything is written and flushed (or
    cannot be written without blocking: a writer stuck in a write; Python's own exit
    would flush stdout and block on it). The interpreter's teardown is skipped on
    purpose: it puts back the default action of the signals the program handles, so
    that one more SIGTERM then would end the program by the signal instead of its
    status. The programs have stopped their threads and closed their sockets by now.
    """
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("text"): the text, then status 1
        print_error(str(status))
        status = 1
    writer = _output.writer
    drained = writer is None or writer.drain(FINISH_WAIT)
    if drained:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except BrokenPipeError:
                _output.mark_closed(stream)
            except OSError as exc:
                _output.mark_failed(stream, exc.strerror or str(exc))
    if _output.closed:
        status = EXIT_CLOSED_OUTPUT
    elif _output.failed is not None:
        name, reason = _output.failed
        print_error(f"{os.path.basename(sys.argv[0])}: cannot write its {name}: {reason}; "
                    "lines were lost")
        if not status:
            status = 1
    os._exit(status)


def run(main):
    """Run a program: make the streams safe (``configure_streams``), call
    ``main()`` and end the process with ``finish`` and what it returned (a usage
    error's ``SystemExit`` status; 130 after Ctrl-C). Never returns."""
    configure_streams()
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except OSError as exc:
        # Out of descriptors or memory before the program could serve at all (the
        # serving paths handle these themselves): a line, not a traceback.
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
            raise
        print_error(f"{os.path.basename(sys.argv[0])}: cannot start: {exc.strerror} "
                    f"(open descriptors allowed: {descriptor_limit()}; raise them with "
                    "ulimit -n)")
        status = 1
    finish(status)


# --- The command line -----------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Show "(default: ...)" only where there is a default worth reading.
    def _get_help_string(self, action):
        if (action.default is None or action.default is False or action.default == []
                or "(default:" in action.help):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the assignment's single-dash options; usage errors exit 2."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description, allow_abbrev=False,
                         formatter_class=_HelpFormatter, **kwargs)

    def _print_message(self, message, file=None):
        # Every message of argparse (usage, errors, --help) goes through the one
        # EPIPE-safe write: `--help | head -n 1` ends quietly with 141.
        if message:
            write_text(file or sys.stderr, message)

    def add_output_options(self, quiet_help=None):
        """Add ``-quiet`` (when ``quiet_help``: the program logs per-packet lines),
        ``-timestamps`` and ``-log-format {text,json}`` (default text, the
        assignment's terminal output)."""
        if quiet_help:
            self.add_argument("-quiet", action="store_true", help=quiet_help)
        self.add_argument("-timestamps", action="store_true",
                          help="start each text line with its time, ISO 8601 UTC with "
                               "milliseconds (2026-11-30T02:20:48.123Z)")
        self.add_argument("-log-format", choices=("text", "json"), default="text",
                          help="json: one JSON object per line, with ts, level, event, "
                               "the event's fields and message")

    def add_limit_options(self, max_conns=1024):
        """Add the limits of a listening program: ``-max-conns``, ``-frame-timeout``
        and ``-idle-timeout`` (defaults: ``max_conns`` connections, 10 s, 300 s;
        nginx's ``client_header_timeout`` is 60 s, HAProxy's ``timeout client`` is
        commonly 30 s to a few minutes).

        Args:
            max_conns: the default of ``-max-conns``, or None: the program computes
                it from its descriptor limit (``descriptor_limit``).
        """
        self.add_argument("-max-conns", type=arg_count, default=max_conns, metavar="N",
                          help="open connections allowed; more are answered OVERLOADED"
                          + ("" if max_conns else " (default: what the descriptor limit "
                             "allows, said at start)"))
        self.add_argument("-frame-timeout", type=arg_seconds, default=10.0,
                          metavar="SECONDS", help="time a frame may take to arrive")
        self.add_argument("-idle-timeout", type=arg_seconds, default=300.0,
                          metavar="SECONDS",
                          help="time a connection may go without a frame either way; "
                               "then it is closed, and frames still unanswered get "
                               "TIMEOUT")

    def add_tls_options(self, cert_help, ca_help):
        """Add ``-tls-cert``/``-tls-key`` (when ``cert_help``) and ``-tls-ca``."""
        if cert_help:
            self.add_argument("-tls-cert", metavar="FILE", help=cert_help)
            self.add_argument("-tls-key", metavar="FILE",
                              help="private key of -tls-cert (PEM)")
        self.add_argument("-tls-ca", metavar="FILE", help=ca_help)

    def parse_program_args(self, argv, check_peers=False):
        """Parse the command line of a listening program (the proxy, a server), set up
        its log (``setup_output``, written by the log writer thread) and load the TLS
        files.

        Args:
            check_peers: with ``-tls-ca``, the listening side checks the certificates
                its peers present (the proxy, for mutual TLS).

        Returns:
            (args, listen_tls, connect_tls): the parsed arguments, the server-side
            ``ssl.SSLContext`` (``-tls-cert``) and the client-side one (``-tls-ca``),
            each None when not asked for. A usage error exits 2.
        """
        args = self.parse_args(argv)
        if (args.tls_cert is None) != (args.tls_key is None):
            self.error("-tls-cert and -tls-key go together")
        setup_output(args)
        try:
            listen_tls = connect_tls = None
            if args.tls_cert:
                listen_tls = netio.server_tls_context(args.tls_cert, args.tls_key,
                                                      args.tls_ca if check_peers else None)
            if args.tls_ca:
                connect_tls = netio.client_tls_context(args.tls_ca, args.tls_cert,
                                                       args.tls_key)
        except (OSError, ValueError) as exc:
            self.error(f"cannot load TLS files: {netio.describe_error(exc)}")
        return args, listen_tls, connect_tls

    def exit_cannot_listen(self, host, port, exc):
        """Report an address that cannot be bound (busy port) and exit 1."""
        self.exit(1, f"{self.prog}: cannot listen on {netio.format_address((host, port))}: "
                     f"{netio.describe_error(exc)}\n")


def arg_type(parse):
    """Make ``parse(text)``, which raises ``ValueError`` naming the value at fault,
    an argparse ``type`` (its error becomes a usage error, exit 2)."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


@arg_type
def arg_port(text):
    """A listening port, 0..65535 (0: pick a free port)."""
    return protocol.parse_port(text)


@arg_type
def arg_hostport(text):
    """``PORT`` or ``HOST:PORT`` of a peer."""
    return protocol.parse_hostport(text)


@arg_type
def arg_hostports(text):
    """``PORT`` or ``HOST:PORT`` of one peer or several, comma-separated."""
    return protocol.parse_hostports(text)


@arg_type
def arg_host(text):
    """A ``-host``: an IP address (IPv6 without brackets) or a DNS name
    (``protocol.is_host``), so that no other text reaches the resolver."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not protocol.is_host(text):
        raise ValueError(f"'{text}' is not an IP address or a DNS name")
    return text


@arg_type
def arg_listen_address(text):
    """``PORT`` or ``HOST:PORT`` to listen on; port 0 picks a free port."""
    return protocol.parse_hostport(text, allow_zero=True)


@arg_type
def arg_id(text):
    """An id or policy id: non-empty text of at most ``protocol.MAX_ID_LENGTH`` (256)
    characters, as a proxy takes them at SETUP (PROTOCOL.md section 10)."""
    if not text:
        raise ValueError("must not be empty")
    text = command_line_text(text)
    if len(text) > protocol.MAX_ID_LENGTH:
        raise ValueError(f"'{text[:20]}...' is {len(text)} characters long; an id has at "
                         f"most {protocol.MAX_ID_LENGTH}")
    return text


def command_line_text(text):
    """``text`` from the command line as the UTF-8 it was typed in. Under a locale
    whose encoding cannot decode it (``LC_ALL=C`` without UTF-8 mode), Python keeps
    the bytes it could not decode as lone surrogates (PEP 383), which no frame can
    carry: they are decoded again here as UTF-8.

    Raises:
        ValueError: the bytes are not UTF-8 either; the message shows them.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = os.fsencode(text)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{raw!r} is not UTF-8 text") from None


@arg_type
def arg_seconds(text):
    """A duration in seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"'{text}' is not a number of seconds above 0")
    return value


# The smallest -max-frame: 512 bytes. Every answer must fit, and an ACK takes about
# 110 bytes plus its two ids (a frame limit below the size of the frames a program
# must receive only turns every exchange into an error). nginx's smallest
# client_header_buffer_size is 1k.
MIN_FRAME_SIZE = 512


@arg_type
def arg_frame_size(text):
    """A -max-frame value: bytes, at least ``MIN_FRAME_SIZE``."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"'{text}' is not a number of bytes")
    if int(text) < MIN_FRAME_SIZE:
        raise ValueError(f"{text} bytes is too small: every answer must fit (an ACK takes "
                         f"about 110 bytes plus its ids); use at least {MIN_FRAME_SIZE}")
    return int(text)


@arg_type
def arg_count(text):
    """A whole number of at least 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"'{text}' is not a whole number of at least 1")
    return int(text)
