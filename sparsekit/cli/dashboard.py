"""`python -m sparsekit dashboard RUN_DIR`: write the static feature dashboard (sparsekit.analysis.dashboard)."""
from __future__ import annotations

import argparse

from sparsekit._util.extras import require
from sparsekit.analysis.dashboard import SCREENSHOT_EXTRA, SCREENSHOT_WHAT, dashboard_from_run, save_screenshot


def main(argv) -> None:
    parser = argparse.ArgumentParser(prog="sparsekit dashboard",
                                     description="write RUN_DIR/dashboard.html from RUN_DIR/*_features.json")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output HTML file (default RUN_DIR/dashboard.html)")
    parser.add_argument("--screenshot", default=None, help="also save a PNG of the page (headless Chromium)")
    parser.add_argument("--show", default="", help="with --screenshot: the section to show, e.g. f-sae-12")
    args = parser.parse_args(argv)
    if args.screenshot:  # before any work: MissingExtra (one line from the sparsekit command) without selenium
        require("selenium.webdriver", SCREENSHOT_EXTRA, what=SCREENSHOT_WHAT, package="selenium")
    try:
        path = dashboard_from_run(args.run_dir, args.out)
    except ValueError as e:
        raise SystemExit(f"sparsekit dashboard: {e}")
    print(path)
    if args.screenshot:
        print(save_screenshot(path, args.screenshot, args.show))
