"""`python -m sparsekit dashboard RUN_DIR`: write the static feature dashboard (sparsekit.analysis.dashboard),
optionally a screenshot of it and the reports as Neuronpedia/SAEDashboard batches (sparsekit.analysis.neuronpedia)."""
from __future__ import annotations

from sparsekit._util.extras import require
from sparsekit.analysis.dashboard import SCREENSHOT_EXTRA, SCREENSHOT_WHAT, dashboard_from_run, save_screenshot
from sparsekit.analysis.neuronpedia import neuronpedia_from_run

from .parser import OneLineParser, path_arg


def main(argv) -> None:
    parser = OneLineParser(prog="sparsekit dashboard",
                                     description="write RUN_DIR/dashboard.html from RUN_DIR/*_features.json")
    parser.add_argument("run_dir", type=path_arg)
    parser.add_argument("--out", type=path_arg, default=None, help="output HTML file (default RUN_DIR/dashboard.html)")
    parser.add_argument("--screenshot", type=path_arg, default=None, help="also save a PNG of the page (headless Chromium)")
    parser.add_argument("--show", default="", help="with --screenshot: the section to show, e.g. f-sae-12")
    parser.add_argument("--neuronpedia", type=path_arg, default=None, metavar="OUT",
                        help="also write OUT/<name>/batch-<i>.json per report: SAEDashboard's Neuronpedia files")
    args = parser.parse_args(argv)
    if args.screenshot:  # before any work: MissingExtra (one line from the sparsekit command) without selenium
        require("selenium.webdriver", SCREENSHOT_EXTRA, what=SCREENSHOT_WHAT, package="selenium")
    try:
        path = dashboard_from_run(args.run_dir, args.out)
        exported = neuronpedia_from_run(args.run_dir, args.neuronpedia) if args.neuronpedia else []
    except ValueError as e:  # a bad report, RefusedFile (too big, too deep, not JSON) among them
        raise SystemExit(f"sparsekit dashboard: {e}")
    except OSError as e:  # an unreadable folder, no room for the page
        raise SystemExit(f"sparsekit dashboard: {e.filename or args.run_dir}: {e.strerror or e}")
    print(path)
    for batch in exported:
        print(batch)
    if args.screenshot:
        print(save_screenshot(path, args.screenshot, args.show))
