#!/usr/bin/env bash
# Screenshot of a run's report.html, whole page, in headless Chromium.
#
#   bench/screenshot_report.sh RUN_DIR OUT.png [WIDTH]
#
# RUN_DIR is a run's --out directory (its report is RUN_DIR/report/report.html,
# written by `greyfed simulate` or `greyfed report RUN_DIR`); WIDTH is the
# window width in CSS pixels (default 1160). Chromium is taken from $CHROMIUM,
# else the first of chromium, chromium-browser, google-chrome, headless_shell
# on the PATH (Debian: apt-get install chromium). Without one, the script
# says so and exits 0: the screenshot is opt-in, never a build requirement.
#
# Two passes: the first loads a copy of the page with a line of JavaScript
# that records the page's height at WIDTH (--dump-dom prints it), the second
# takes the screenshot with a window that tall, so nothing is cut off.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 RUN_DIR OUT.png [WIDTH]" >&2
    exit 2
fi
run_dir=$1
out=$2
width=${3:-1160}
html="$run_dir/report/report.html"
if [[ ! -f $html ]]; then
    echo "error: $html not found; run \`greyfed report $run_dir\` first" >&2
    exit 1
fi

browser=${CHROMIUM:-}
if [[ -n $browser ]] && ! command -v "$browser" >/dev/null 2>&1; then
    echo "skipped: CHROMIUM=$browser is not an executable"
    exit 0
fi
if [[ -z $browser ]]; then
    for name in chromium chromium-browser google-chrome headless_shell; do
        if command -v "$name" >/dev/null 2>&1; then
            browser=$(command -v "$name")
            break
        fi
    done
fi
if [[ -z $browser ]]; then
    echo "skipped: no headless Chromium found (set CHROMIUM=/path/to/chromium, or apt-get install chromium)"
    exit 0
fi

html_abs=$(cd "$(dirname "$html")" && pwd)/$(basename "$html")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Headless Chromium as root needs --no-sandbox; a private profile keeps it
# from touching the user's.
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --mute-audio
    --no-first-run --user-data-dir="$tmp/profile" --force-device-scale-factor=1)

# Pass 1: the page's height at this width (the report's images carry their
# sizes, so the layout is final before they are decoded).
sed 's|</body>|<script>document.body.setAttribute("data-page-height", Math.ceil(document.documentElement.scrollHeight));</script></body>|' \
    "$html_abs" >"$tmp/measure.html"
height=$("$browser" "${flags[@]}" --window-size="$width,800" --dump-dom \
    "file://$tmp/measure.html" 2>/dev/null |
    grep -o 'data-page-height="[0-9]*"' | grep -o '[0-9]*' | head -n 1 || true)
if [[ -z $height ]]; then
    height=6000
    echo "warning: could not measure the page; using a window $height pixels tall" >&2
fi

# Pass 2: the screenshot.
"$browser" "${flags[@]}" --window-size="$width,$height" --screenshot="$out" \
    "file://$html_abs" >/dev/null 2>&1
if [[ ! -s $out ]]; then
    echo "error: $browser wrote no screenshot to $out" >&2
    exit 1
fi
echo "screenshot: $out (${width}x${height})"
