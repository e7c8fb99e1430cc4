"""A static, self-contained HTML feature dashboard: feature list, search box, one page per feature.

    write_dashboard({"sae": report}, "runs/lm/dashboard.html")     # reports from feature_report
    sparsekit dashboard RUN_DIR                                     # every RUN_DIR/*features.json

The page opens on the overview (one line and one summary row per dictionary) with the first
feature below it; a feature picked on the left (or a ``#f-<name>-<id>`` link) shows alone.

Dead latents are counted over different tokens by different stages, and the page says which:
"never fired" in the overview and the summary counts over the report's evaluation tokens (the census);
"dead at the end of training" is the training's own figure (no fire within its last
``dead_window_tokens`` training tokens), from ``report["training"]`` or the run's
``<name>/metrics.jsonl`` last line. A short evaluation finds more never-fired latents than training's
window (e.g. 52 against 7), so the two differ by design.

Everything is rendered here, in Python. A report is checked before anything is rendered
(``check_report``): feature ids must be ints and every number a finite number, so no field reaches
the page unformatted; every piece of text (token strings, names, model and hook names: a
``*_features.json`` may be hostile) passes through ``html.escape``; links are in-page anchors built
from those checked ids. The page's small script only shows and hides sections and filters the list,
and never inserts markup. One file, no network.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.bounded import LINE_LIMIT, load_json, parse_json
from sparsekit._util.extras import require
from sparsekit._util.validate import is_int, is_number

REPORT_SUFFIX = "features.json"
REPORT_MAX_BYTES = 2**30  # a report keeps top examples per feature: tens of MB for 65k latents
DASHBOARD_FILE = "dashboard.html"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
nav{width:250px;border-right:1px solid #ccc;display:flex;flex-direction:column}
nav input{margin:8px;padding:6px;font-size:14px}
#feature-list{overflow-y:auto;flex:1;margin:0;padding:0;list-style:none}
#feature-list li a{display:block;padding:4px 10px;color:#124;text-decoration:none;font-size:13px;white-space:nowrap;
  overflow:hidden;text-overflow:ellipsis}
#feature-list li a:hover,#feature-list li a.current{background:#e4ecf7}
main{flex:1;overflow-y:auto;padding:16px 24px}
.stats td{padding:2px 12px 2px 0}
.example{font-family:ui-monospace,monospace;font-size:13px;margin:4px 0;line-height:1.9;white-space:pre-wrap}
.tok{border-radius:2px;padding:1px 0}
.tok.max{outline:2px solid #c33}
.logits{display:flex;gap:40px}
.logits td{font-family:ui-monospace,monospace;font-size:13px;padding:0 8px}
h2{margin-top:0}
.census{font-size:13px;color:#555}
.summary{border-collapse:collapse;font-size:13px;margin:12px 0}
.summary td,.summary th{border-bottom:1px solid #ddd;padding:3px 10px;text-align:right}
.summary td:nth-child(-n+2),.summary th:nth-child(-n+2){text-align:left}
"""

_SCRIPT = """
(function(){
  var links = document.querySelectorAll('#feature-list a');
  function show(){
    var id = decodeURIComponent(location.hash.slice(1));
    var target = id ? document.getElementById(id) : null;
    var shown;
    if(target && target.classList.contains('feature')) shown = [target];
    else shown = [document.getElementById('overview'), document.querySelector('main > section.feature')];
    document.querySelectorAll('main > section').forEach(function(s){ s.hidden = shown.indexOf(s) < 0; });
    links.forEach(function(a){
      a.classList.toggle('current', shown.some(function(s){ return s && a.getAttribute('href') === '#' + s.id; }));
    });
  }
  document.getElementById('search').addEventListener('input', function(e){
    var q = e.target.value.toLowerCase();
    links.forEach(function(a){ a.parentNode.hidden = q && a.dataset.search.indexOf(q) < 0; });
  });
  window.addEventListener('hashchange', show);
  show();
})();
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


FEATURE_NUMBERS = ("density", "max_act", "mean_act")
TRAINING_NUMBERS = ("dead_frac", "tokens", "step", "dead_window_tokens")
OPTIONAL_NUMBERS = ("token_share", "single_token_ratio")


def _number(value, where: str) -> None:
    if not is_number(value) or value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{where} must be a finite number, got {value!r:.80}")


def _check_feature(feature, where: str) -> None:
    if not isinstance(feature, dict):
        raise ValueError(f"{where} must be an object, got {type(feature).__name__}")
    if not is_int(feature.get("id")) or feature["id"] < 0:
        raise ValueError(f"{where}.id must be a non-negative int, got {feature.get('id')!r:.80}")
    for key in FEATURE_NUMBERS:
        _number(feature.get(key), f"{where}.{key}")
    for key in OPTIONAL_NUMBERS:
        if key in feature:
            _number(feature[key], f"{where}.{key}")
    examples = feature.get("examples")
    if not isinstance(examples, list):
        raise ValueError(f"{where}.examples must be a list")
    for j, example in enumerate(examples):
        at = f"{where}.examples[{j}]"
        if not isinstance(example, dict) or not isinstance(example.get("tokens"), list) \
                or not isinstance(example.get("acts"), list) or len(example["tokens"]) != len(example["acts"]):
            raise ValueError(f"{at} must hold equally long lists tokens and acts")
        if not example["acts"] or not all(isinstance(token, str) for token in example["tokens"]):
            raise ValueError(f"{at}.tokens must be a non-empty list of strings")
        for value in (*example["acts"], example.get("max_act")):
            _number(value, f"{at}.acts/max_act")
        if not is_int(example.get("max_position")) or not 0 <= example["max_position"] < len(example["tokens"]):
            raise ValueError(f"{at}.max_position must index its tokens, got {example.get('max_position')!r:.80}")
    histogram = feature.get("histogram")
    if not isinstance(histogram, dict) or not all(is_number(c) for c in histogram.get("counts") or []) \
            or (histogram.get("counts") and not (isinstance(histogram.get("edges"), list) and histogram["edges"])):
        raise ValueError(f"{where}.histogram must hold numeric counts and a list of edges")
    for value in (histogram.get("edges") or [])[-1:]:
        _number(value, f"{where}.histogram.edges")
    logits = feature.get("logits")
    if logits:
        for key in ("promoted", "suppressed"):
            for pair in logits.get(key, []) if isinstance(logits, dict) else [None]:
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise ValueError(f"{where}.logits.{key} must hold [token, value] pairs")
                _number(pair[1], f"{where}.logits.{key} value")


def check_report(name, report, where: str = "report") -> None:
    """A feature report (``lm_features.feature_report``'s dict, or a ``*_features.json`` read back) is
    safe to render: a string name, ids that are ints, numbers that are finite numbers; a ValueError
    naming the field otherwise. Strings are escaped when rendered, so any text is allowed."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: the dictionary name must be a non-empty string, got {name!r:.80}")
    if not isinstance(report, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(report).__name__}")
    training = report.get("training")
    if training is not None:
        if not isinstance(training, dict):
            raise ValueError(f"{where}.training must be an object, got {type(training).__name__}")
        for key in TRAINING_NUMBERS:
            if key in training:
                _number(training[key], f"{where}.training.{key}")
    features = report.get("features", [])
    if not isinstance(features, list):
        raise ValueError(f"{where}.features must be a list")
    for i, feature in enumerate(features):
        _check_feature(feature, f"{where}.features[{i}]")


def _visible(token: str) -> str:
    return token.replace("\n", "\u21b5\n").replace("\t", "\u21e5")


def _example_html(example: dict) -> str:
    peak = max(max(example["acts"]), 1e-12)
    spans = []
    for i, (token, act) in enumerate(zip(example["tokens"], example["acts"])):
        alpha = max(0.0, min(1.0, act / peak))
        cls = "tok max" if i == example["max_position"] else "tok"
        spans.append(f'<span class="{cls}" style="background:rgba(230,120,20,{alpha:.2f})" '
                     f'title="{act:.3f}">{_e(_visible(token))}</span>')
    return f'<div class="example" data-max="{example["max_act"]:.3f}">{"".join(spans)}</div>'


def _histogram_svg(histogram: dict) -> str:
    counts = histogram.get("counts") or []
    if not counts:
        return ""
    width, height, top = 300, 80, max(counts) or 1
    bar = width / len(counts)
    bars = "".join(f'<rect x="{i * bar:.1f}" y="{height - c / top * height:.1f}" width="{bar - 1:.1f}" '
                   f'height="{c / top * height:.1f}" fill="#3b6ea5"/>' for i, c in enumerate(counts))
    return (f'<svg class="histogram" width="{width}" height="{height + 16}" role="img">{bars}'
            f'<text x="0" y="{height + 14}" font-size="11">0</text>'
            f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">{_e(histogram["edges"][-1])}</text></svg>')


def _logits_html(logits) -> str:
    if not logits:
        return "<p>No logit effects (the dictionary does not write to the residual stream directly).</p>"
    tables = []
    for title, key in (("promoted", "promoted"), ("suppressed", "suppressed")):
        rows = "".join(f"<tr><td>{_e(repr(token))}</td><td>{value:+.3f}</td></tr>" for token, value in logits[key])
        tables.append(f"<table><caption>{title}</caption>{rows}</table>")
    return f'<div class="logits">{"".join(tables)}</div>'


def _feature_html(name: str, report: dict, feature: dict, hidden: bool = True) -> str:
    fid = f"{name}-{feature['id']}"
    stats = [("density", f"{feature['density']:.5f}"), ("max activation", f"{feature['max_act']:.3f}"),
             ("mean activation (when active)", f"{feature['mean_act']:.3f}"),
             ("token share", f"{feature.get('token_share', float('nan')):.3f} ({feature.get('kind', '?')})"),
             ("[BOS, top token] / top activation", f"{feature.get('single_token_ratio', float('nan')):.3f}")]
    stats_html = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in stats)
    examples = "".join(_example_html(x) for x in feature["examples"])
    hide = " hidden" if hidden else ""
    return (f'<section class="feature" id="f-{_e(fid)}"{hide}><h2>{_e(name)} feature {_e(feature["id"])}</h2>'
            f'<p class="census">{_e(report.get("model", ""))} · {_e(report.get("hook", ""))}</p>'
            f'<table class="stats">{stats_html}</table><h3>Activation histogram (non-zero)</h3>'
            f'{_histogram_svg(feature["histogram"])}<h3>Logit effects</h3>{_logits_html(feature.get("logits"))}'
            f'<h3>Top activating contexts</h3><div class="examples">{examples}</div></section>')


def _link_html(name: str, feature: dict) -> str:
    top = feature["examples"][0] if feature["examples"] else None
    token = top["tokens"][top["max_position"]] if top else ""
    search = f"{name} {feature['id']} {token} {feature.get('kind', '')}".lower()
    return (f'<li><a href="#f-{_e(name)}-{_e(feature["id"])}" data-search="{_e(search)}">{_e(name)} #{_e(feature["id"])} '
            f'<small>{_e(repr(token))}</small></a></li>')


SUMMARY_COLUMNS = (("FVU", "fvu", "{:.3f}"), ("L0", "l0", "{:.1f}"), ("CE recovered", "ce_recovered", "{:.3f}"),
                   ("KL", "kl", "{:.4f}"))
DEAD_TRAINING_HEAD = "dead at end of training (no fire in its last dead-window of training tokens)"
NEVER_FIRED_HEAD = "never fired on the evaluation tokens"


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _training_dead(report: dict) -> str:
    """'7 of 2,048 (step 290, 297,000 tokens trained)' from report["training"], or '?'."""
    training, n = report.get("training"), report.get("n_latents")
    if not isinstance(training, dict) or "dead_frac" not in training or not is_int(n):
        return "?"
    where = [f"step {int(training['step']):,}"] if "step" in training else []
    if "tokens" in training:
        where.append(f"{int(training['tokens']):,} tokens trained")
    if "dead_window_tokens" in training:
        where.append(f"window {int(training['dead_window_tokens']):,} tokens")
    return f"{round(training['dead_frac'] * n):,} of {n:,}" + (f" ({', '.join(where)})" if where else "")


def _never_fired(report: dict) -> str:
    """'52 of 2,048 on 8,255 tokens' from the census, or '?'."""
    census = report.get("census", {})
    if not isinstance(census, dict) or "dead" not in census:
        return "?"
    return (f"{_count(census['dead'])} of {_count(report.get('n_latents', '?'))} on "
            f"{_count(report.get('tokens', '?'))} tokens")


def _summary_html(reports: dict) -> str:
    """One row per dictionary: its metrics when the report carries "metrics" (lm_splice_metrics' keys;
    '?' otherwise), the two dead counts, each over what it counts, and the census."""
    rows = []
    for name, report in reports.items():
        metrics, census = report.get("metrics"), report.get("census", {})
        metrics = metrics if isinstance(metrics, dict) else {}
        cells = [_e(name), _e(f"{report.get('hook', '')} → {report.get('output_hook', '')}")]
        for _, key, form in SUMMARY_COLUMNS:
            value = metrics.get(key)
            cells.append(_e(form.format(value)) if isinstance(value, (int, float)) else "?")
        cells += [_e(_training_dead(report)), _e(_never_fired(report)),
                  _e(f"{census.get('single_token', '?')} / {census.get('reported', '?')}")]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["dictionary", "hook"] + [c[0] for c in SUMMARY_COLUMNS] + [DEAD_TRAINING_HEAD, NEVER_FIRED_HEAD,
                                                                       "single-token / shown"]
    return ('<table class="summary"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) +
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def dashboard_html(reports: dict, title: str = "sparsekit feature dashboard") -> str:
    """The page for {name: feature_report(...)} as one HTML string."""
    if not isinstance(reports, dict) or not reports:
        raise ValueError("reports must be a non-empty dict {name: feature report}")
    for name, report in reports.items():
        check_report(name, report, f"reports[{name!r:.80}]")
    links, sections, overview = [], [], []
    landing = ("Below: the first feature of the first dictionary (the densest). Pick another on the left."
               if any(r.get("features") for r in reports.values()) else "No features to show.")
    for name, report in reports.items():
        census = report.get("census", {})
        overview.append(f"<li><strong>{_e(name)}</strong>: {_e(report.get('architecture', ''))} on {_e(report.get('model', ''))} "
                        f"{_e(report.get('hook', ''))} → {_e(report.get('output_hook', ''))}; {_e(report.get('n_latents', ''))} "
                        f"latents; never fired on the evaluation tokens: {_e(_never_fired(report))}; dead at the end "
                        f"of training: {_e(_training_dead(report))}; of "
                        f"{_e(census.get('reported', '?'))} shown, {_e(census.get('single_token', '?'))} single-token and "
                        f"{_e(census.get('context', '?'))} context-dependent</li>")
        for feature in report.get("features", []):
            links.append(_link_html(name, feature))
            sections.append(_feature_html(name, report, feature, hidden=bool(sections)))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<style>{_STYLE}</style></head><body><nav><input id="search" type="search" '
            f'placeholder="search: id, token, kind" aria-label="search features"><ul id="feature-list">'
            f'{"".join(links)}</ul></nav><main><section id="overview"><h2>{_e(title)}</h2><ul>{"".join(overview)}</ul>'
            f'{_summary_html(reports)}<p>{_e(landing)}</p></section>{"".join(sections)}</main>'
            f'<script>{_SCRIPT}</script></body></html>')


def write_dashboard(reports: dict, path, title: str = "sparsekit feature dashboard") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, dashboard_html(reports, title).encode("utf-8"))
    return path


def save_report(report: dict, run_dir, name: str) -> Path:
    """RUN_DIR/<name>_features.json, which ``sparsekit dashboard RUN_DIR`` reads."""
    path = Path(run_dir) / f"{name}_{REPORT_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(report).encode("utf-8"))
    return path


TRAINING_LOG = "metrics.jsonl"
TRAINING_LOG_TAIL = 1 << 16  # bytes read from the end of a training log


def training_dead(log) -> dict | None:
    """The last line of a training's metrics.jsonl as {"dead_frac", "step", "tokens"} (None when the
    file is missing or its last line is not such a record). Only the file's last 64 KiB are read, and
    each line through ``sparsekit._util.bounded.parse_json`` (lines that are not such a record, too
    long or nested too deep are passed over)."""
    log = Path(log)
    if not log.is_file():
        return None
    with open(log, "rb") as handle:
        handle.seek(max(0, log.stat().st_size - TRAINING_LOG_TAIL))
        lines = handle.read(TRAINING_LOG_TAIL).decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        if len(line) > LINE_LIMIT:
            continue  # no metric line is that long
        try:
            record = parse_json(line, log)
        except ValueError:  # RefusedFile: cut short by a crash, garbage, nested too deep
            continue
        if isinstance(record, dict) and is_number(record.get("dead_frac")):
            return {key: record[key] for key in ("dead_frac", "step", "tokens") if is_number(record.get(key))}
    return None


def read_reports(run_dir) -> dict:
    """{name: report} from every RUN_DIR/<name>_features.json, each read under REPORT_MAX_BYTES and
    64 levels of nesting (``sparsekit._util.bounded.load_json``) and checked (``check_report``); a
    report without a "training" block gets one from RUN_DIR/<name>/metrics.jsonl when that exists."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob(f"*_{REPORT_SUFFIX}"))
    if not files:
        raise ValueError(f"RUN_DIR {run_dir} holds no *_{REPORT_SUFFIX} (feature reports: see "
                         f"sparsekit.analysis.lm_features.feature_report and dashboard.save_report)")
    reports = {}
    for f in files:
        try:
            reports[f.name[:-len(REPORT_SUFFIX) - 1]] = load_json(f, REPORT_MAX_BYTES, what="feature report")
        except ValueError as error:  # RefusedFile: not a regular file, too large, not UTF-8, too deep
            raise ValueError(f"{f} is not a JSON feature report: {error}") from None
        except OSError as error:
            raise ValueError(f"{f} is unreadable: {error.strerror or error}") from None
    for name, report in reports.items():
        if isinstance(report, dict) and "training" not in report:
            training = training_dead(run_dir / name / TRAINING_LOG)
            if training is not None:
                report["training"] = training
        check_report(name, report, str(run_dir / f"{name}_{REPORT_SUFFIX}"))
    return reports


def dashboard_from_run(run_dir, out=None) -> Path:
    """Every RUN_DIR/<name>_features.json -> RUN_DIR/dashboard.html (or out)."""
    run_dir = Path(run_dir)
    return write_dashboard(read_reports(run_dir), out or run_dir / DASHBOARD_FILE,
                           title=f"sparsekit features: {run_dir.name}")


SCREENSHOT_EXTRA = "screenshot"  # pyproject: screenshot = ["selenium>=4.10"]
SCREENSHOT_WHAT = "sparsekit dashboard --screenshot"

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage")


def headless_chromium(profile_dir, window: tuple[int, int] = (1280, 800)):
    """A selenium driver for Debian's headless ``chromium`` + ``chromedriver`` (no network use), with
    the browser console log kept; the caller quits it. profile_dir: a fresh folder for its profile.
    MissingExtra (one line naming the ``screenshot`` extra) without selenium."""
    import shutil
    webdriver = require("selenium.webdriver", SCREENSHOT_EXTRA, what=SCREENSHOT_WHAT, package="selenium")
    Service = require("selenium.webdriver.chrome.service", SCREENSHOT_EXTRA, what=SCREENSHOT_WHAT,
                      package="selenium").Service
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        raise RuntimeError("headless Chromium needs Debian's chromium and chromium-driver "
                           "(apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile_dir}", f"--window-size={window[0]},{window[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def save_screenshot(page, png, fragment: str = "", window: tuple[int, int] = (1280, 800)) -> Path:
    """PNG of the dashboard page (fragment: e.g. "f-sae-12" to show that feature) in headless Chromium."""
    import tempfile
    page, png = Path(page).resolve(), Path(png)
    with tempfile.TemporaryDirectory() as profile:
        driver = headless_chromium(profile, window)
        try:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {  # the PNG is exactly window
                "width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False})
            driver.get(page.as_uri() + (f"#{fragment}" if fragment else ""))
            png.parent.mkdir(parents=True, exist_ok=True)
            if not driver.save_screenshot(str(png)):
                raise RuntimeError(f"chromium could not write {png}")
        finally:
            driver.quit()
    return png
