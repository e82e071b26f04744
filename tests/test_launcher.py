"""Tests of the demo launcher, main_linux (README, "The demo").

* The window layout is pure (``grid``, ``xterm_command``): checked for the usual
  screens, without a display.
* Headless runs: the summary, the stats page's address, the logs, ``-hold`` until
  SIGINT or SIGTERM with every node still serving, the busy-port check, the range of
  ``-port``.
* Window mode under Xvfb with xterm: eleven windows titled by node, on the screen and
  not overlapping, still open after the summary (hold is the default), a screenshot;
  Ctrl-C stops every node and closes every window. Skipped, naming the Debian packages,
  where Xvfb, xterm, x11-utils or ImageMagick is missing.

The demo uses fixed ports, BASE to BASE+25 as in the assignment, so port 0 does not
apply: each test picks a base whose six ports are free, below Linux's ephemeral range
(32768-60999) where other tests' port-0 listeners and connections live. Every run is
stopped and every process it left is killed by PID at the end of its test.
"""

import importlib.util
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from importlib.machinery import SourceFileLoader

import pytest

from conftest import ROOT, WAIT, Node, run

_loader = SourceFileLoader("main_linux", os.path.join(ROOT, "main_linux"))
launcher = importlib.util.module_from_spec(importlib.util.spec_from_loader("main_linux", _loader))
_loader.exec_module(launcher)

RUN_TIMEOUT = 60.0  # seconds for a whole demo run: 11 nodes, each with a 10 s bound
STOP_TIMEOUT = 30.0  # seconds for a launcher to stop its nodes (each is bounded to 6 s)
PROGRAMS = ("reverse_proxy.py", "server.py", "client.py")
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
X_TOOLS = ("Xvfb", "xterm", "xwininfo", "import")
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


def wait_until(condition, what, timeout=WAIT):
    """Poll ``condition()`` until it returns a true value, and return that value;
    after ``timeout`` seconds, fail the test with ``what`` (a string, or a function
    that returns one then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what() if callable(what) else what} within {timeout} s")
        time.sleep(0.1)  # polling interval


class Launchers:
    """Runs of main_linux for one test; ``cleanup`` stops them and kills what they
    left, by PID."""

    def __init__(self):
        self.runs = []

    def start(self, base, *options):
        node = Node(["main_linux", "-port", str(base), *options], name="main_linux")
        self.runs.append((node, base))
        return node

    def cleanup(self):
        for node, base in self.runs:
            node.signal(signal.SIGTERM)
            try:
                node.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                node.kill()
            for pid in leftovers(base, node.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def launchers():
    group = Launchers()
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


def assert_stops(node, signum, base):
    """``signum`` stops the launcher with the summary's status, 0, and no process of
    the run is left."""
    node.signal(signum)
    assert node.wait(STOP_TIMEOUT) == 0, node.output
    assert "main_linux: stopping every node" in node.lines
    wait_until(lambda: not leftovers(base, node.proc.pid),
               lambda: f"processes of the run not gone: {leftovers(base, node.proc.pid)}")


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


# ---- headless ----

def test_headless_demo_prints_summary_and_stats_page_then_stops():
    base = free_base()
    result = run("main_linux", "-headless", "-port", base, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    plain = "".join(line + "\n" for line in result.stdout.splitlines()
                    if not line.startswith("["))
    assert plain == (f"\n{SUMMARY}Stats page: http://127.0.0.1:{base + 25}/ "
                     "(the nodes stop now: -hold keeps them running)\n")
    assert "[client1]    Hash of payload is correct\n" in result.stdout
    assert f"[proxy]      Running the reverse proxy on port {base}\n" in result.stdout
    with open(os.path.join(ROOT, "logs", "client1.log"), encoding="utf-8") as log:
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


def test_a_busy_port_is_reported_before_anything_starts():
    base = free_base()
    with socket.create_server(("127.0.0.1", base + 25)):
        result = run("main_linux", "-headless", "-port", base)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"main_linux: port {base + 25} is busy (Address already in "
                             "use); stop what uses it or choose another base port with "
                             "-port\n")


@pytest.mark.parametrize("port", ["0", "65511"])
def test_base_port_out_of_range_is_a_usage_error(port):
    result = run("main_linux", "-headless", "-port", port)
    assert result.returncode == 2
    assert result.stderr.endswith(
        "main_linux: error: argument -port: the base port must be from 1 to 65510 "
        f"(servers and the stats page use BASE+5 to BASE+25), got {port}\n")


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

    assert_held_and_serving(node, base)
    assert top_windows() == windows
    assert_stops(node, signal.SIGINT, base)
    wait_until(lambda: not top_windows(), "every window closed")
