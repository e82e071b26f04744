"""Tests of the demo launcher, main_linux (README, "The demo").

* The window layout is pure (``grid``, ``xterm_command``): checked for the usual
  screens, without a display. The stop signals' handling (``StopSignals``) is
  checked in this process, with real signals.
* Headless runs: the summary, the stats page's address, the logs, ``-hold`` until
  SIGINT or SIGTERM with every node still serving; SIGHUP, SIGQUIT, and any stop
  signal before the summary, stop every node with 128 + N; a terminal that closes
  (a pty hung up) does too; ``nohup`` keeps it running.
* The command line and the output: the busy-port check, ``-port`` and its range,
  ``--help`` and the demo into a closed pipe (141, no traceback), a latin-1 stdout, a
  logs/ that cannot be written.
* Window mode under Xvfb with xterm: eleven windows titled by node, on the screen
  (their borders too) and not overlapping, still open after the summary (hold is the
  default), a screenshot; Ctrl-C stops every node and closes every window. Skipped,
  naming the Debian packages, where Xvfb, xterm, x11-utils or ImageMagick is missing.

The demo uses fixed ports, BASE to BASE+25 as in the assignment, so port 0 does not
apply: each test picks a base whose six ports are free, below Linux's ephemeral range
(32768-60999) where other tests' port-0 listeners and connections live. Tests that read
the logs or change the demo's files run a copy of it in their tmp_path, so that two
runs at once (two workers) never share logs/. Every run is stopped and every process
it left is killed by PID at the end of its test.
"""

import fcntl
import glob
import importlib.util
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import termios
import time
import urllib.request
from importlib.machinery import SourceFileLoader

import pytest

from conftest import PROGRAMS, PYTHON, ROOT, WAIT, Node, run, wait_until

_loader = SourceFileLoader("main_linux", os.path.join(ROOT, "main_linux"))
launcher = importlib.util.module_from_spec(importlib.util.spec_from_loader("main_linux", _loader))
_loader.exec_module(launcher)

RUN_TIMEOUT = 60.0  # seconds for a whole demo run: 11 nodes, each with a 10 s bound
STOP_TIMEOUT = 30.0  # seconds for a launcher to stop its nodes (each is bounded to 6 s)
SUMMARY = """\
client  policy  answered by server  hash correct
------  ------  ------------------  ------------
1       111     100                 yes
2       111     300                 yes
3       222     200                 yes
4       111     100                 yes
5       222     400                 yes
6       222     200                 yes

All six clients verified their hash.
"""
SCREEN = (1280, 800)
X_TOOLS = ("Xvfb", "xterm", "xwininfo", "import", "convert")
X_PACKAGES = "apt-get install xvfb xterm x11-utils imagemagick"


def demo_ports(base):
    return [base, base + 5, base + 10, base + 15, base + 20, base + 25]


def free_base():
    """A base port whose six demo ports are free, from 20000 to 32000."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - 25)
        if not launcher.busy_ports(demo_ports(base)):
            return base
    pytest.fail("no base port from 20000 to 32000 with its six demo ports free")


def leftovers(base, launcher_pid=None):
    """PIDs of what a run left: its nodes (a program given port ``base``) and, if
    ``launcher_pid``, its windows' xterm and tail (given ``--pid=launcher_pid``)."""
    mark = f"--pid={launcher_pid}" if launcher_pid else None
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode("utf-8", "replace").split("\0")
        except OSError:  # not a process, or gone
            continue
        node = any(os.path.basename(arg) in PROGRAMS for arg in args[:2]) and str(base) in args
        if node or mark in args:
            found.append(int(entry))
    return found


class Launchers:
    """Runs of main_linux for one test, from a copy of the demo (``demo``, so that
    the checkout's logs/ stay the user's); ``cleanup`` stops them and kills what
    they left, by PID."""

    def __init__(self, demo):
        self.launcher = str(demo / "main_linux")
        self.runs = []

    def start(self, base, *options, preexec=None):
        """A run whose output is collected (a conftest Node)."""
        node = Node([self.launcher, "-port", str(base), *options], name="main_linux",
                    preexec=preexec)
        self.runs.append((node.proc, base))
        return node

    def popen(self, base, *options, **popen_args):
        """A run with the stdio of ``popen_args`` (subprocess.Popen's)."""
        proc = subprocess.Popen([PYTHON, self.launcher, "-port", str(base), *options],
                                cwd=ROOT, **popen_args)
        self.runs.append((proc, base))
        return proc

    def cleanup(self):
        for proc, base in self.runs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)
            for pid in leftovers(base, proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def launchers(demo_copy):
    group = Launchers(demo_copy)
    yield group
    group.cleanup()


def assert_held_and_serving(node, base):
    """The launcher is still running after its summary, and so are the proxy, its
    stats page and the servers: another client gets its answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{base + 25}/", timeout=WAIT) as page:
        assert page.status == 200
    client = run("client.py", "-id", "7", "-revproc", base, "-pkt",
                 os.path.join("pktfiles", "1.json"))
    assert client.returncode == 0, client.stdout + client.stderr
    assert "Hash of payload is correct" in client.stdout
    assert node.proc.poll() is None


@pytest.fixture
def demo_copy(tmp_path):
    """A copy of the demo (main_linux, the programs, pktfiles/) in tmp_path, without
    logs/; returns its directory."""
    copy = tmp_path / "demo"
    shutil.copytree(os.path.join(ROOT, "pktfiles"), copy / "pktfiles")
    for path in [os.path.join(ROOT, "main_linux"), *glob.glob(os.path.join(ROOT, "*.py"))]:
        shutil.copy2(path, copy)
    return copy


def assert_nothing_left(base, launcher_pid=None):
    wait_until(lambda: not leftovers(base, launcher_pid),
               lambda: f"processes of the run not gone: {leftovers(base, launcher_pid)}")


def assert_stops(node, signum, base, status=0):
    """``signum`` stops the launcher with ``status`` (the summary's, 0, by default),
    saying so in one line, and no process of the run is left."""
    node.signal(signum)
    assert node.wait(STOP_TIMEOUT) == status, node.output
    said = [line for line in node.lines if line.startswith("main_linux")]
    assert said == [f"main_linux: {signal.Signals(signum).name} received; every node "
                    "stopped"], node.output
    assert_nothing_left(base, node.proc.pid)


# ---- the window layout, pure ----

def test_grid_of_eleven_windows_on_1600x900():
    # 4 columns x 3 rows of 400x300 px; the proxy takes the 12th cell.
    assert launcher.grid(11, (0, 0, 1600, 900), room=(0, 0)) == [
        (0, 0, 800, 300), (800, 0, 400, 300), (1200, 0, 400, 300),
        (0, 300, 400, 300), (400, 300, 400, 300), (800, 300, 400, 300),
        (1200, 300, 400, 300),
        (0, 600, 400, 300), (400, 600, 400, 300), (800, 600, 400, 300),
        (1200, 600, 400, 300)]


def test_grid_leaves_room_for_frames_and_follows_the_work_area():
    # A panel of 27 px at the top: the grid starts below it.
    rects = launcher.grid(11, (0, 27, 1920, 1053), room=(8, 40))
    assert rects[0] == (0, 27, 952, 311)
    assert rects[1] == (960, 27, 472, 311)
    assert rects[10] == (1440, 729, 472, 311)


@pytest.mark.parametrize("area", [(0, 0, 1024, 768), (0, 0, 1280, 800), (0, 0, 1366, 768),
                                  (0, 27, 1920, 1053), (0, 0, 1080, 1920),
                                  (0, 0, 3840, 2160)])
@pytest.mark.parametrize("room", [(0, 0), launcher.FRAME_ROOM])
def test_grid_fits_the_screen_without_overlap(area, room):
    left, top, width, height = area
    # Each window with its frame, as a window manager would draw it.
    framed = [(x, y, w + room[0], h + room[1])
              for x, y, w, h in launcher.grid(11, area, room=room)]
    assert len(framed) == 11
    for x, y, w, h in framed:
        assert left <= x and x + w <= left + width and top <= y and y + h <= top + height
        columns, rows = launcher.text_size((x, y, w - room[0], h - room[1]),
                                           launcher.XTERM_CELL, launcher.XTERM_PAD)
        assert columns >= 50 and rows >= 11, (columns, rows)
    for i, a in enumerate(framed):
        for b in framed[i + 1:]:
            assert not overlap(a, b), (a, b)


def test_xterm_command_fills_its_rectangle():
    # 316 - 6 = 310 px: 51 characters of 6 px; 264 - 6 = 258 px: 19 lines of 13 px.
    assert launcher.xterm_command("client 1", (640, 266, 316, 264), ["tail", "log"]) == [
        "xterm", "-T", "client 1", "-fn", "fixed", "-b", "2", "-bw", "1",
        "-geometry", "51x19+640+266", "-e", "tail", "log"]


def overlap(a, b):
    """True if rectangles ``a`` and ``b`` (x, y, width, height) share a pixel."""
    return (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and
            a[1] < b[1] + b[3] and b[1] < a[1] + a[3])


# ---- the stop signals, in this process ----

@pytest.fixture
def stop_signals():
    """A StopSignals installed in this process; the handlers before it are restored."""
    before = {signum: signal.getsignal(signum) for signum in launcher.STOP_SIGNALS}
    signals = launcher.StopSignals()
    signals.install()
    yield signals
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_the_first_stop_signal_raises_stop_and_later_ones_are_absorbed(stop_signals):
    with pytest.raises(launcher.Stop) as stop:
        signal.raise_signal(signal.SIGHUP)
    assert stop.value.signum == signal.SIGHUP
    signal.raise_signal(signal.SIGINT)  # while the nodes stop: nothing happens
    assert stop_signals.first == signal.SIGHUP


def test_a_stop_signal_during_a_start_is_raised_at_its_end(stop_signals):
    recorded = []
    with pytest.raises(launcher.Stop) as stop:
        with stop_signals.deferred():
            signal.raise_signal(signal.SIGQUIT)
            recorded.append("node")  # the node started is recorded, to be stopped
    assert (recorded, stop.value.signum) == (["node"], signal.SIGQUIT)


def test_once_the_nodes_stop_every_stop_signal_is_absorbed(stop_signals):
    stop_signals.absorb()
    for signum in launcher.STOP_SIGNALS:
        signal.raise_signal(signum)
    assert stop_signals.first == 0


def test_a_sighup_ignored_from_the_start_stays_ignored():
    # nohup: the demo outlives the terminal. SIGINT ignored (a shell's background
    # job) is caught all the same.
    before = {signum: signal.getsignal(signum) for signum in launcher.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signals = launcher.StopSignals()
        signals.install()
        signal.raise_signal(signal.SIGHUP)
        assert signals.first is None
        with pytest.raises(launcher.Stop) as stop:
            signal.raise_signal(signal.SIGINT)
        assert stop.value.signum == signal.SIGINT
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


# ---- headless ----

def plain_lines(output):
    """The launcher's own lines of ``output``: without the nodes' ("[name] ...")."""
    return "".join(line + "\n" for line in output.splitlines() if not line.startswith("["))


def test_headless_demo_prints_summary_and_stats_page_then_stops(demo_copy):
    base = free_base()
    result = run(demo_copy / "main_linux", "-headless", "-port", base, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert plain_lines(result.stdout) == (
        f"\n{SUMMARY}Stats page: http://127.0.0.1:{base + 25}/ "
        "(the nodes stop now: -hold keeps them running)\n")
    assert "[client1]    Hash of payload is correct\n" in result.stdout
    assert f"[proxy]      Running the reverse proxy on port {base}\n" in result.stdout
    with open(demo_copy / "logs" / "client1.log", encoding="utf-8") as log:
        assert log.read().endswith("Hash of payload is correct\n")
    assert leftovers(base) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_hold_keeps_nodes_running_until_a_signal(launchers, signum):
    base = free_base()
    node = launchers.start(base, "-headless", "-hold")
    node.wait_for("^All six clients verified their hash.$", RUN_TIMEOUT)
    node.wait_for(rf"^Stats page: http://127\.0\.0\.1:{base + 25}/ "
                  r"\(the nodes keep running: Ctrl-C stops them\)$")
    assert_held_and_serving(node, base)
    assert_stops(node, signum, base)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_sighup_or_sigquit_ends_a_hold_with_128_plus_its_number(launchers, signum):
    # kill -HUP (the shell of a closed terminal), Ctrl-\: not how a hold is meant to
    # end, so the status is the signal's, as a shell reports it; every node stops.
    base = free_base()
    node = launchers.start(base, "-headless", "-hold")
    node.wait_for("^Stats page: ", RUN_TIMEOUT)
    assert_stops(node, signum, base, status=128 + signum)


@pytest.mark.parametrize("signum", launcher.STOP_SIGNALS,
                         ids=[sig.name for sig in launcher.STOP_SIGNALS])
def test_a_stop_signal_before_the_summary_stops_every_node_with_128_plus_n(
        launchers, signum):
    base = free_base()
    node = launchers.start(base, "-headless")
    node.wait_for(r"^\[proxy\] +Running the reverse proxy on port")
    assert_stops(node, signum, base, status=128 + signum)
    assert not any(line.startswith("All six") for line in node.lines), node.output


def read_until(fd, marker, timeout):
    """Read ``fd`` until ``marker`` (bytes) appears, for up to ``timeout`` seconds;
    return what was read (an EOF or EIO, a hung-up pty's end, ends it too)."""
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_closing_the_terminal_stops_every_node_with_129(launchers):
    # The launcher runs in a pty that is its controlling terminal; closing the pty's
    # master end hangs it up: the kernel sends SIGHUP, and every write then fails
    # with EIO, which must not end the launcher before it stops its nodes.
    base = free_base()
    master, slave = os.openpty()
    try:
        proc = launchers.popen(
            base, "-headless", "-hold", stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    finally:
        os.close(slave)
    try:
        output = read_until(master, b"Stats page: ", RUN_TIMEOUT)
        assert b"Stats page: " in output, output[-2000:]
    finally:
        os.close(master)
    assert proc.wait(STOP_TIMEOUT) == 128 + signal.SIGHUP
    assert_nothing_left(base, proc.pid)


def test_nohup_keeps_the_demo_running_when_the_terminal_closes(launchers):
    base = free_base()
    node = launchers.start(base, "-headless", "-hold",
                           preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    node.wait_for("^Stats page: ", RUN_TIMEOUT)
    node.signal(signal.SIGHUP)
    assert_held_and_serving(node, base)
    # Had SIGHUP been caught, it would have been the first signal, named and 129.
    assert_stops(node, signal.SIGTERM, base)


# ---- the command line and the output ----

def test_a_busy_port_is_reported_before_anything_starts():
    base = free_base()
    with socket.create_server(("127.0.0.1", base + 25)):
        result = run("main_linux", "-headless", "-port", base)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"main_linux: port {base + 25} is busy (Address already in "
                             "use); stop what uses it or choose another base port with "
                             "-port\n")


@pytest.mark.parametrize("port", ["0", "65511", "notaport", "2100.5", "\u0664\u0665"])
def test_a_base_port_out_of_range_or_not_a_number_is_a_usage_error(port):
    result = run("main_linux", "-headless", "-port", port)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "usage: main_linux [-h] [-port BASE] [-headless] [-hold | -no-hold]\n"
        f"main_linux: error: argument -port: '{port}' is not a base port from 1 to "
        "65510 (the servers and the stats page use BASE+5 to BASE+25)\n")


def test_help_names_every_option_and_the_exit_statuses():
    result = run("main_linux", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(
        "usage: main_linux [-h] [-port BASE] [-headless] [-hold | -no-hold]\n")
    assert "stats page BASE+25 (default: 2100)" in result.stdout
    assert "128 + N when signal N stopped it" in " ".join(result.stdout.split())


def test_help_into_a_closed_pipe_ends_quietly_with_141():
    # `main_linux --help | head -n 1`, the pipe closed before the help is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([PYTHON, "main_linux", "--help"], cwd=ROOT, timeout=WAIT,
                                stdin=subprocess.DEVNULL, stdout=write_end,
                                stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, b"")


def test_demo_piped_into_head_stops_every_node_and_ends_quietly_with_141(launchers):
    # `main_linux | head -n 1`: the pipe closes after the first line, while the proxy
    # starts. Not "the reverse proxy did not start", no traceback: 141.
    base = free_base()
    read_end, write_end = os.pipe()
    try:
        proc = launchers.popen(base, "-headless", stdin=subprocess.DEVNULL,
                               stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    try:
        first = read_line(read_end, RUN_TIMEOUT)
    finally:
        os.close(read_end)
    assert first.startswith(b"[proxy]      "), first
    _, errors = proc.communicate(timeout=STOP_TIMEOUT)
    assert (proc.returncode, errors) == (141, b"")
    assert_nothing_left(base)


def test_a_latin_1_stdout_shows_non_ascii_escaped(demo_copy, monkeypatch):
    (demo_copy / "pktfiles" / "1.json").write_text(
        '{"type": "0", "srcid": "1", "privPoliId": "111", "payload": "\u65e5\u672c"}\n',
        encoding="utf-8")
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1")
    base = free_base()
    result = run(demo_copy / "main_linux", "-headless", "-port", base, timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    assert (f"[client1]    Sending message \\u65e5\\u672c to privacy policy 111 through "
            f"reverse proxy running on port {base}\n") in result.stdout
    assert plain_lines(result.stdout).startswith(f"\n{SUMMARY}")
    # The logs keep the text itself, in UTF-8.
    log = (demo_copy / "logs" / "client1.log").read_text(encoding="utf-8")
    assert log.startswith("Sending message \u65e5\u672c to privacy policy 111")
    assert leftovers(base) == []


@pytest.mark.parametrize("how", ["logs is a file", "read-only directory"])
def test_logs_that_cannot_be_written_are_one_line_and_status_1(demo_copy, how):
    if how == "logs is a file":
        (demo_copy / "logs").write_text("", encoding="utf-8")
        why = "Not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write in a read-only directory (the case 'logs is a "
                        "file' checks the same error path as root)")
        why = "Permission denied"
    demo_copy.chmod(0o555)
    try:
        result = run(demo_copy / "main_linux", "-headless", "-port", free_base())
    finally:
        demo_copy.chmod(0o755)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"main_linux: cannot write the nodes' logs in {demo_copy / 'logs'}: {why}; the "
        "demo needs a writable directory there: run it from a writable copy\n")


# ---- windows, under Xvfb ----

def read_line(fd, timeout):
    """Read ``fd`` up to a newline, its end, or ``timeout`` seconds; return the bytes."""
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def display(monkeypatch):
    """An Xvfb screen of SCREEN px on a free display number; DISPLAY names it."""
    missing = [tool for tool in X_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"window mode needs {', '.join(missing)}: {X_PACKAGES}")
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "{}x{}x24".format(*SCREEN),
         "-nolisten", "tcp"], pass_fds=(write_end,), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    # Xvfb writes the number, then a newline, and dies if the pipe is closed between.
    number = read_line(read_end, WAIT).decode().strip()
    os.close(read_end)
    try:
        if not number.isdigit():
            pytest.fail(f"Xvfb gave no display number within {WAIT} s")
        monkeypatch.setenv("DISPLAY", f":{number}")
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        yield f":{number}"
    finally:
        xvfb.terminate()
        xvfb.wait(WAIT)


def top_windows():
    """[(title, (x, y, width, height))] of the viewable top-level windows that have a
    name; each rectangle in px, border included."""
    tree = subprocess.run(["xwininfo", "-root", "-children"], capture_output=True,
                          text=True, timeout=WAIT).stdout
    windows = []
    for window_id, title in re.findall(r'^\s+(0x[0-9a-f]+) "(.*)": ', tree, re.M):
        info = subprocess.run(["xwininfo", "-id", window_id], capture_output=True,
                              text=True, timeout=WAIT).stdout
        fields = dict(re.findall(r"^\s+([A-Z][\w -]+):\s+(\S+)", info, re.M))
        if fields.get("Map State") != "IsViewable":
            continue
        border = int(fields["Border width"])
        windows.append((title, (int(fields["Absolute upper-left X"]),
                                int(fields["Absolute upper-left Y"]),
                                int(fields["Width"]) + 2 * border,
                                int(fields["Height"]) + 2 * border)))
    return sorted(windows)


def at_least(count, items):
    """``items`` if there are ``count`` or more, else None (for wait_until)."""
    return items if len(items) >= count else None


def png_size(path):
    """(width, height) of a PNG file, from its IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def grey_levels(path, rect):
    """The grey levels (0 to 255) of the pixels of ``rect`` (x, y, width, height) in
    the image ``path``, row by row."""
    x, y, width, height = rect
    return list(subprocess.run(
        ["convert", str(path), "-crop", f"{width}x{height}+{x}+{y}", "-colorspace", "gray",
         "-depth", "8", "gray:-"], check=True, timeout=WAIT, capture_output=True).stdout)


def test_windows_tile_the_screen_and_stay_until_ctrl_c(display, launchers, tmp_path):
    base = free_base()
    titles = sorted([f"proxy :{base}", "server 100 (policy 111)", "server 200 (policy 222)",
                     "server 300 (policy 111)", "server 400 (policy 222)",
                     *(f"client {n}" for n in range(1, 7))])
    node = launchers.start(base)  # window mode: hold is the default
    node.wait_for("^All six clients verified their hash.$", RUN_TIMEOUT)
    node.wait_for(rf"^Stats page: http://127\.0\.0\.1:{base + 25}/ "
                  r"\(the nodes keep running: Ctrl-C stops them\)$")
    windows = wait_until(lambda: at_least(11, top_windows()), "eleven viewable windows")
    assert [title for title, _ in windows] == titles
    rects = [rect for _, rect in windows]
    for x, y, width, height in rects:
        assert 0 <= x and x + width <= SCREEN[0] and 0 <= y and y + height <= SCREEN[1]
        # At least 50 columns and 16 lines of the 6x13 px font, inner border included.
        assert width >= 50 * 6 + 6 and height >= 16 * 13 + 6, (x, y, width, height)
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert not overlap(a, b), (a, b)

    screenshot = tmp_path / "demo-windows.png"
    subprocess.run(["import", "-window", "root", str(screenshot)], check=True,
                   timeout=WAIT, capture_output=True)
    assert png_size(screenshot) == SCREEN
    # Without a window manager, the proxy's window, at the top left, shows its 1 px
    # border (black) on the screen's first column and row, its inner border (white)
    # next to it: the border is not off the screen, nor the window 1 px in.
    (_, _, width, height), = [rect for _, rect in windows if rect[:2] == (0, 0)]
    assert grey_levels(screenshot, (0, height // 2, 2, 1)) == [0, 255]
    assert grey_levels(screenshot, (width // 2, 0, 1, 2)) == [0, 255]

    assert_held_and_serving(node, base)
    assert top_windows() == windows
    assert_stops(node, signal.SIGINT, base)
    wait_until(lambda: not top_windows(), "every window closed")
