"""The attribution graph's static HTML view in a real headless Chromium (as tests/analysis/test_dashboard.py):
it loads without console errors, draws every node and edge, clicking a node shows its details and
edges, a feature's logit effects and top contexts (the active token highlighted), a URL fragment
selects a node, and token text such as <script> is shown, never run."""
import json
import shutil
from urllib.parse import quote

import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

from sparsekit.analysis.circuits import attribute, graph_to_json, prune
from sparsekit.analysis.circuits.contexts import context_windows, top_contexts
from sparsekit.analysis.circuits.view import graph_html, write_graph_html
from sparsekit.analysis.dashboard import headless_chromium
from sparsekit.sae.clt import CrossLayerTranscoder

EVIL = "<script>window.__pwned = 1</script>"


def pruned_graph_json():
    model = tiny_transformer(3, seed=2)
    clt = CrossLayerTranscoder(16, 2 * 16, n_layers=2, k_per_layer=3, first_layer=1, seed=1)
    with torch.no_grad():
        clt.b_enc.fill_(0.5)
    graph = attribute(model, clt, random_contexts(1, 6, seed=4)[0], max_logits=3, special_ids=None, progress=False)
    data = graph_to_json(prune(graph, max_nodes=25))
    table = top_contexts(model, clt, random_contexts(6, 10, seed=5), examples=3, special_ids=None)
    data["tokens"][2] = EVIL
    for node in data["nodes"]:
        if node["position"] == 2:
            node["token"] = EVIL
        if node["kind"] == "feature":
            node["contexts"] = context_windows(table, model, node["layer"] - clt.first_layer, node["latent"])
            for window in node["contexts"]:
                window["tokens"][window["active"]] = EVIL
            node["promoted"][0][0] = EVIL
    return data


def test_graph_html_embeds_escaped_json():
    data = pruned_graph_json()
    page = graph_html(data)
    assert "<script>window.__pwned" not in page and page.count("<script") == 2
    start = page.index('id="graph-data">') + len('id="graph-data">')
    assert json.loads(page[start:page.index("</script>", start)]) == data
    with pytest.raises(ValueError, match="graph must be a Graph"):
        graph_html({"nodes": []})


def test_graph_html_summary_gives_the_influence_shares_and_says_loudly_when_no_feature_is_kept():
    data = pruned_graph_json()
    share = data["settings"]["influence_share"]
    page = graph_html(data)
    assert "NO FEATURE NODES" not in page and f"carried by features {share['feature']:.0%}" in page
    features = {n["id"] for n in data["nodes"] if n["kind"] == "feature"}
    assert features
    data["nodes"] = [n for n in data["nodes"] if n["id"] not in features]
    data["edges"] = [e for e in data["edges"] if not {e["source"], e["target"]} & features]
    assert "NO FEATURE NODES" in graph_html(data)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail("headless Chromium tests need Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_graph_view_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    data = pruned_graph_json()
    page = write_graph_html(data, tmp_path / "graph.html")
    browser.get(page.as_uri())
    circles = browser.find_elements(By.CSS_SELECTOR, "circle.node")
    assert len(circles) == len(data["nodes"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.edge")) == len(data["edges"])
    axis = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.axis")]
    assert f"2: {EVIL}" in axis  # shown as text
    # each feature labelled with its top token (shortened), tooltips with layer and position
    tops = [t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "text.top-token")]
    expected = [n["top_tokens"][0] for n in data["nodes"] if n["kind"] == "feature"]
    assert tops and tops == [e if len(e) <= 8 else e[:7] + "\u2026" for e in expected]
    tips = [t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "circle.node title")]
    assert all(tip.startswith(f"layer {n['layer']}, position {n['position']} ") for tip, n in zip(tips, data["nodes"]))
    assert browser.execute_script("return window.__pwned === undefined")
    # click the strongest edge's target: its details and that edge among its inputs
    target = data["edges"][0]["target"]
    index = [node["id"] for node in data["nodes"]].index(target)
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                           browser.find_element(By.ID, f"node-{index}"))
    assert browser.find_element(By.ID, "details-title").text == target
    assert "selected" in browser.find_element(By.ID, f"node-{index}").get_attribute("class")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.strongest-inputs tr")
    assert rows and rows[0].text.split()[0] == data["edges"][0]["source"]
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, json.dumps(errors)


def test_feature_details_show_logit_effects_and_top_contexts(browser, tmp_path):
    from selenium.webdriver.common.by import By
    data = pruned_graph_json()
    page = write_graph_html(data, tmp_path / "graph.html")
    feature = next(n for n in data["nodes"] if n["kind"] == "feature" and n["contexts"])
    # opened with the feature's id as the fragment: selected without a click
    browser.get(page.as_uri() + "#" + quote(feature["id"], safe=""))
    assert browser.find_element(By.ID, "details-title").text == feature["id"]
    effects = browser.find_elements(By.CSS_SELECTOR, "table.logit-effects tr")
    assert len(effects) == 1 + len(feature["promoted"])
    promoted = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.logit-effects td.promoted")]
    assert promoted == [token for token, _ in feature["promoted"]] and promoted[0] == EVIL
    shown = browser.find_elements(By.CSS_SELECTOR, "#top-contexts .context")
    assert len(shown) == len(feature["contexts"])
    for div, window in zip(shown, feature["contexts"]):
        active = div.find_elements(By.CSS_SELECTOR, "span.active")
        assert len(active) == 1 and active[0].text == window["tokens"][window["active"]] == EVIL
        assert len(div.find_elements(By.CSS_SELECTOR, "span")) == len(window["tokens"]) + 1  # + the value
    assert browser.execute_script("return window.__pwned === undefined")
    # an error node has neither section
    error = [n["id"] for n in data["nodes"]].index(next(n["id"] for n in data["nodes"] if n["kind"] == "error"))
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                           browser.find_element(By.ID, f"node-{error}"))
    assert not browser.find_elements(By.ID, "top-contexts") and not browser.find_elements(By.CSS_SELECTOR,
                                                                                          "table.logit-effects")
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, json.dumps(errors)
