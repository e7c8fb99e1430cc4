"""The static feature dashboard in a real headless Chromium (Debian chromium + chromium-driver via
selenium): loads without console errors, the list renders, clicking a feature shows its examples,
search filters, and token text such as <script> is shown, never executed."""
import json
import shutil

import pytest
import torch

from sparsekit import cli
from sparsekit.analysis.dashboard import dashboard_from_run, dashboard_html, headless_chromium, save_report

EVIL = ["<script>window.__pwned = 1</script>", "<img src=x onerror=\"window.__pwned=2\">", "\"'&amp;"]


def feature(fid, tokens, acts, kind="context"):
    peak = max(range(len(acts)), key=acts.__getitem__)
    return {"id": fid, "density": 0.01 * (fid + 1), "max_act": max(acts), "mean_act": 1.0,
            "histogram": {"edges": [0, 1, 2], "counts": [3, 1]},
            "examples": [{"context": 0, "max_position": peak, "max_act": max(acts), "tokens": tokens, "acts": acts}],
            "logits": {"promoted": [(" Paris", 1.5), (EVIL[0], 1.0)], "suppressed": [(" the", -0.5)]},
            "single_token_ratio": 0.2, "kind": kind}


def report():
    return {"model": "tiny<b>", "hook": "blocks.0.hook_resid_post", "output_hook": "blocks.0.hook_resid_post",
            "architecture": "topk", "n_latents": 8, "tokens": 100,
            "census": {"features": 8, "dead": 2, "reported": 3, "single_token": 1, "context": 2},
            "features": [feature(0, [" To", " be", " or"], [0.1, 2.0, 0.3]),
                         feature(3, [" x", EVIL[0], EVIL[1], EVIL[2]], [0.0, 3.0, 1.0, 0.5]),
                         feature(5, [" Rome", "\n"], [1.0, 0.2], kind="single-token")]}


def test_every_token_string_is_escaped_in_the_markup():
    page = dashboard_html({"sae": report()})
    assert "<script>window.__pwned" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own


def test_dashboard_command_reads_run_dir(tmp_path, capsys):
    save_report(report(), tmp_path, "sae")
    cli.main(["dashboard", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "dashboard.html")
    assert (tmp_path / "dashboard.html").read_text().count('class="feature"') == 3
    with pytest.raises(SystemExit, match="holds no \\*_features.json"):
        cli.main(["dashboard", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="reports must be a non-empty dict"):
        dashboard_html({})


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail("headless Chromium tests need Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_dashboard_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    save_report(report(), tmp_path, "sae")
    page = dashboard_from_run(tmp_path)
    browser.get(page.as_uri())
    links = browser.find_elements(By.CSS_SELECTOR, "#feature-list a")
    assert [a.text.split()[1] for a in links] == ["#0", "#3", "#5"]
    # the landing page: the overview and, below it, the first feature with its examples
    assert browser.find_element(By.ID, "overview").is_displayed()
    first = browser.find_element(By.ID, "f-sae-0")
    assert first.is_displayed() and first.find_element(By.CSS_SELECTOR, ".example").is_displayed()
    assert not browser.find_element(By.ID, "f-sae-3").is_displayed()
    assert "current" in links[0].get_attribute("class") and "current" not in links[1].get_attribute("class")

    links[1].click()
    section = browser.find_element(By.ID, "f-sae-3")
    assert section.is_displayed() and not browser.find_element(By.ID, "overview").is_displayed()
    assert not first.is_displayed()
    example = section.find_element(By.CSS_SELECTOR, ".example")
    spans = example.find_elements(By.CSS_SELECTOR, ".tok")
    assert [s.text for s in spans][1:] == [EVIL[0], EVIL[1], EVIL[2]]   # shown as text
    assert "max" in spans[1].get_attribute("class")
    assert browser.execute_script("return window.__pwned === undefined")  # nothing ran
    assert not browser.find_elements(By.CSS_SELECTOR, "main img")

    search = browser.find_element(By.ID, "search")
    search.send_keys("rome")
    visible = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#feature-list a") if a.is_displayed()]
    assert len(visible) == 1 and "#5" in visible[0]

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, json.dumps(errors)


def summary_rows(page):
    start = page.index('<table class="summary">')
    return page[start:page.index("</table>", start)].split("<tr>")[2:]


def test_overview_summarises_every_dictionary_with_metrics():
    with_metrics = dict(report(), metrics={"fvu": 0.25, "l0": 32.0, "ce_recovered": 0.875, "kl": 0.0123,
                                           "dead_frac": 0.5})
    page = dashboard_html({"layer0": with_metrics, "layer<2>": dict(with_metrics, metrics={"fvu": 0.5}),
                           "plain": report()})
    rows = summary_rows(page)
    assert len(rows) == 3  # "plain" has no metrics: a row of "?" but its dead counts
    assert "<td>0.250</td><td>32.0</td><td>0.875</td><td>0.0123</td><td>?</td><td>2 of 8 on 100 tokens</td>" \
           "<td>1 / 3</td>" in rows[0]
    assert "layer&lt;2&gt;" in rows[1] and rows[1].count("<td>?</td>") == 4
    assert rows[2].count("<td>?</td>") == 5 and "2 of 8 on 100 tokens" in rows[2]


def test_summary_labels_training_dead_and_never_fired_counts_with_what_each_counts_over(tmp_path):
    """The training's dead fraction (its last metrics.jsonl line: no fire in its dead window) and the
    report's never-fired count (its evaluation tokens) are different numbers: both shown, each labelled."""
    n_latents, dead_eval, dead_frac = 2048, int(torch.randint(20, 80, ())), int(torch.randint(1, 15, ())) / 2048
    rep = dict(report(), n_latents=n_latents, tokens=8255, census=dict(report()["census"], dead=dead_eval))
    save_report(rep, tmp_path, "sae")
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "tokens": 10240, "dead_frac": 0.9}) + "\n" +
        json.dumps({"step": 290, "tokens": 296960, "dead_frac": dead_frac}) + "\n" + '{"step": 30')  # cut short
    page = dashboard_from_run(tmp_path).read_text()
    row = summary_rows(page)[0]
    assert f"<td>{round(dead_frac * 2048)} of 2,048 (step 290, 296,960 tokens trained)</td>" in row
    assert f"<td>{dead_eval} of 2,048 on 8,255 tokens</td>" in row
    assert "dead at end of training (no fire in its last dead-window of training tokens)" in page
    assert "never fired on the evaluation tokens" in page
    overview = page[page.index('<section id="overview">'):page.index("</section>")]
    assert f"never fired on the evaluation tokens: {dead_eval} of 2,048 on 8,255 tokens" in overview
    # a report that carries its own training block keeps it; a NaN there is refused by name
    rep["training"] = {"dead_frac": float("nan")}
    save_report(rep, tmp_path, "sae")
    with pytest.raises(ValueError, match=r"sae_features\.json\.training\.dead_frac must be a finite number"):
        dashboard_from_run(tmp_path)


def test_the_first_feature_is_in_view_without_script():
    page = dashboard_html({"sae": report(), "other": report()})
    sections = page.split('<section class="feature" ')[1:]
    assert len(sections) == 6
    assert sections[0].startswith('id="f-sae-0">') and all(' hidden>' in s.split("<h2>")[0] for s in sections[1:])


def test_screenshot_shows_the_chosen_feature(tmp_path, capsys):
    save_report(report(), tmp_path, "sae")
    png = tmp_path / "shot.png"
    cli.main(["dashboard", str(tmp_path), "--screenshot", str(png), "--show", "f-sae-3"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "dashboard.html"), str(png)]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 800)


def test_every_text_field_of_a_hostile_report_is_escaped():
    """Names, model, hook, architecture, kind and tokens all carry markup: none reaches the page raw."""
    hostile = report()
    for key in ("model", "hook", "output_hook", "architecture"):
        hostile[key] = EVIL[1]
    hostile["census"]["dead"] = EVIL[0]
    hostile["features"][0]["kind"] = EVIL[1]
    page = dashboard_html({EVIL[0]: hostile, "javascript:alert(1)": report()}, title=EVIL[1])
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    assert page.count("<script>") == 1 and 'href="javascript:' not in page
    assert all(href.startswith("#f-") for href in page.split('href="')[1:] for href in [href.split('"')[0]])


@pytest.mark.parametrize("field, value, message", [
    ("id", "<img src=x onerror=alert(1)>", r"features\[0\]\.id must be a non-negative int"),
    ("id", -1, r"features\[0\]\.id must be a non-negative int"),
    ("density", "0.1\"><script>", r"features\[0\]\.density must be a finite number"),
    ("max_act", float("nan"), r"features\[0\]\.max_act must be a finite number"),
    ("examples", [{"tokens": ["a"], "acts": [1.0, 2.0], "max_position": 0, "max_act": 2.0}],
     r"examples\[0\] must hold equally long lists"),
    ("examples", [{"tokens": ["a"], "acts": [1.0], "max_position": 3, "max_act": 1.0}],
     r"examples\[0\]\.max_position must index its tokens"),
    ("logits", {"promoted": [["a", "<b>"]], "suppressed": []}, r"logits\.promoted value must be a finite number"),
    ("histogram", None, r"histogram must hold numeric counts"),
])
def test_a_report_field_of_the_wrong_kind_is_refused_before_rendering(tmp_path, field, value, message):
    bad = report()
    bad["features"][0][field] = value
    with pytest.raises(ValueError, match=message):
        dashboard_html({"sae": bad})
    save_report(bad, tmp_path, "sae")
    with pytest.raises(ValueError, match=r"sae_features\.json\.features\[0\]"):
        dashboard_from_run(tmp_path)


def test_a_features_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "sae_features.json").write_bytes(b"\xff{not json")
    with pytest.raises(ValueError, match="sae_features.json is not a JSON feature report"):
        dashboard_from_run(tmp_path)
