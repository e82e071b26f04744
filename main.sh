#!/bin/sh
# Demo launcher for macOS: each node in a Terminal window of its own (through
# osascript), titled by node and tiled over the screen, kept until Ctrl-C, as in the
# course assignment; or headless over SSH. The launcher itself is main_linux, a Python
# script that runs the same on macOS and Linux (./main_linux --help).
cd "$(dirname "$0")" || exit 1
exec python3 ./main_linux "$@"
