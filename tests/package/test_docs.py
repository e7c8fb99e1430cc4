"""The README and docs/ stay true to the tree: the layout page names every module and nothing that
is not there, links and named paths resolve, no page names a deprecated import path, the README
stays short, and every python block either runs in a test or says why it cannot."""
import ast
import re
from pathlib import Path

import pytest
import torch

import sparsekit
from sparsekit import _moved

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LAYOUT = ROOT / "docs" / "layout.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("sparsekit", "kernels/sparsekit_kernels")  # the second is installed as sparsekit.kernels
TOP_LEVEL = ("sparsekit/", "kernels/", "csrc/", "bench/", "tests/", "tools/", "requirements/", "docs/")

# Python blocks, by (page, the heading above them): where each runs, or why it cannot run in the suite.
RUN = {
    ("README.md", "Train a dictionary"): "tests/package/test_readme.py",
    ("README.md", "Call the ops"): "tests/package/test_docs.py",
    ("docs/backends.md", "Backends"): "tests/package/test_docs.py",
    ("docs/interop.md", "torch.compile"): "tests/package/test_docs_interop.py",
    ("docs/interop.md", "NumPy and DLPack (JAX, CuPy)"): "tests/package/test_docs_interop.py",
    ("docs/interop.md", "SAELens, both ways"): "tests/package/test_docs_interop.py",
    ("docs/interop.md", "Sharing dictionaries: the Hub, sparsify, dictionary_learning"): "tests/sae/test_sharing_doc.py",
    ("docs/interop.md", "Hugging Face transformers, without TransformerLens"): "tests/package/test_docs_interop.py",
    ("docs/interop.md", "Weights & Biases"): "tests/package/test_docs_interop.py",
}
NOT_RUN = {
    ("README.md", "Share, steer"):
        "needs a trained run folder, a model and the Hub; each call runs in a test: tests/sae/test_sharing_doc.py "
        "(load, push_to_hub, the exports), tests/analysis/test_splice.py and test_steering.py (splice, steer)",
    ("docs/studies.md", "Language models: SmolLM2-135M, offline"):
        "loads SmolLM2-135M and trains on 300k tokens (minutes on 2 cores); make demo-lm runs the same "
        "pipeline, tests/studies/test_lm_pipeline.py its parts on a tiny model",
    ("docs/scaling.md", "Scaling past one machine"):
        "needs torchrun and a 2**20-latent dictionary; tests/training/test_distributed.py runs the same calls "
        "(through tests/helpers/distributed_worker.py) on small dictionaries",
    ("docs/design.md", "Public API (names later work and checks depend on)"):
        "a signature sketch (`lr=...`, alternatives joined by |), not a program",
}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def sections(path: Path):
    """(heading, python code) for every ```python block of a page, headings read outside code blocks."""
    heading, fence, code, blocks = None, None, [], []
    for line in path.read_text().splitlines():
        if fence is None and line.startswith("```"):
            fence, code = line[3:].strip(), []
        elif fence is not None and line.startswith("```"):
            if fence == "python":
                blocks.append((heading, "\n".join(code) + "\n"))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def block(page: str, heading: str) -> str:
    found = [code for title, code in sections(ROOT / page) if title == heading]
    assert len(found) == 1, f"{page}: expected one python block under {heading!r}, found {len(found)}"
    return found[0]


def anchors(path: Path) -> set:
    """GitHub's anchors for a page's headings."""
    slugs = set()
    for line in prose(path.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


# --- the layout page against the tree --------------------------------------------------------------

def modules_in_tree() -> dict:
    """Every module and package under the packages, as the path the layout page must name:
    'sparsekit/ops/cpu/gemm.py', and 'sparsekit/ops/cpu/' for a package (or its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            if path.name == "__init__.py":
                found[rel(path.parent) + "/"] = {rel(path.parent) + "/", rel(path)}
            else:
                found[rel(path)] = {rel(path)}
    return found


def paths_named(text: str) -> set:
    """Repository paths a page names in `code` spans (ones starting with a top-level folder);
    placeholders (<date>, *, {a,b}) are not paths."""
    named = set()
    for span in re.findall(r"`([^`\s]+)`", prose(text)):
        if any(c in span for c in "<>*{}$~") or "://" in span:
            continue
        if span.startswith(TOP_LEVEL):
            named.add(span.rstrip(".,;:"))
    return named


def test_layout_names_every_module():
    named = paths_named(LAYOUT.read_text())
    missing = [path for path, accepted in modules_in_tree().items() if not accepted & named]
    assert not missing, (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in docs/layout.md: "
                         "add a row saying what each holds")


def test_layout_names_nothing_that_is_missing():
    gone = sorted(path for path in paths_named(LAYOUT.read_text()) if not (ROOT / path).exists())
    assert not gone, f"docs/layout.md names {', '.join(gone)}, not in the tree: rename or remove the row"


def test_every_path_a_page_names_exists():
    gone = [f"{rel(page)}: {path}" for page in PAGES for path in sorted(paths_named(page.read_text()))
            if not (ROOT / path).exists()]
    assert not gone, "pages name paths that do not exist:\n" + "\n".join(gone)


def test_no_page_names_a_deprecated_import_path():
    stale = []
    for page in PAGES:
        text = page.read_text()
        for old, new in _moved.MOVED.items():
            if re.search(rf"(?<![\w.]){re.escape(old)}(?!\w)", text):
                stale.append(f"{rel(page)}: {old} (now {new})")
    assert not stale, "pages name import paths that moved:\n" + "\n".join(stale)


# --- links and length -------------------------------------------------------------------------------

def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{rel(page)}: {target} (no heading #{anchor} in {rel(path)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines (at most 300): move detail into docs/"


def test_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)\)", README.read_text()))
    pages = {rel(page) for page in PAGES[1:]}
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"


# --- python blocks ----------------------------------------------------------------------------------

def test_every_python_block_runs_or_says_why_not():
    blocks = {(rel(page), heading) for page in PAGES for heading, _ in sections(page)}
    listed = set(RUN) | set(NOT_RUN)
    assert blocks <= listed, (f"python blocks that no test runs: {sorted(blocks - listed)}; run each in a test "
                              "(and list it in RUN) or say in NOT_RUN why it cannot run")
    assert listed <= blocks, f"listed blocks not in the pages: {sorted(listed - blocks)}"


def test_readme_ops_example(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    code = block("README.md", "Call the ops")
    assert len(code.strip().splitlines()) <= 12
    code = code.replace("4096", "256").replace("16384", "2048")  # the same calls, smaller
    namespace = {}
    exec(compile(code, "README.md (Call the ops)", "exec"), namespace)
    codes, x_hat = namespace["codes"], namespace["x_hat"]
    assert codes.values.shape == codes.indices.shape == (256, 32) and x_hat.shape == (256, 512)
    expected = sparsekit.ops.reference.sparse_decode(codes.values, codes.indices, namespace["W_dec"], namespace["b_dec"])
    torch.testing.assert_close(x_hat, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = namespace[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_backends_example():
    code = block("docs/backends.md", "Backends")
    call, shown = re.fullmatch(r">>> (.+)\n(.+)\n", code).groups()
    assert call == "sparsekit.backends()"
    assert set(eval(call, {"sparsekit": sparsekit})) == set(ast.literal_eval(shown))


@pytest.mark.parametrize("page", [rel(page) for page in PAGES])
def test_python_blocks_parse(page):
    for heading, code in sections(ROOT / page):
        if (page, heading) in NOT_RUN and "..." in code:
            continue  # a sketch
        if not code.startswith(">>> "):
            compile(code, f"{page} ({heading})", "exec")


def test_the_train_config_table_is_the_fields_own_help():
    from sparsekit.training.config import fields_table
    table = fields_table()
    assert table in (ROOT / "docs" / "training.md").read_text(), (
        "docs/training.md's TrainConfig table differs from the fields' metadata; paste the output of\n"
        "python -c 'from sparsekit.training.config import fields_table; print(fields_table())'")
