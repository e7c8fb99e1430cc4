"""A missing optional dependency is one line naming the pip extra that brings it: the library
raises sparsekit._util.extras.MissingExtra (an ImportError), and the ``sparsekit`` command prints the
line to stderr and exits 2, with no traceback. Each case runs in a subprocess where the module is
made unimportable with ``sys.modules[name] = None`` before sparsekit is imported."""
import json
import subprocess
import sys
import textwrap

import pytest

from sparsekit._util.extras import MissingExtra, require


def run_without(modules, code: str, *args) -> subprocess.CompletedProcess:
    hide = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", "import sys\n" + hide + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=300)


def library_error(modules, call: str) -> dict:
    """The exception `call` raises in a process without `modules`: its type, message and extra."""
    result = run_without(modules, f"""
        import json
        from sparsekit._util.extras import MissingExtra
        try:
            {call}
        except MissingExtra as e:
            print(json.dumps({{"type": type(e).__name__, "import_error": isinstance(e, ImportError),
                              "message": str(e), "extra": e.extra, "package": e.package}}))
        else:
            print(json.dumps({{"type": None}}))
        """)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_require_returns_the_module_or_raises_one_line_naming_the_extra():
    import json as json_module
    assert require("json", "none") is json_module
    with pytest.raises(MissingExtra) as raised:
        require("sparsekit_no_such_module_here", "things", what="the thing")
    assert str(raised.value) == "the thing needs sparsekit-no-such-module-here: pip install 'sparsekit[things]'"
    assert isinstance(raised.value, ImportError) and raised.value.extra == "things"


def test_require_lets_a_broken_installation_show_its_own_error(tmp_path, monkeypatch):
    # A package that is there but whose own import fails on something else: not a missing extra.
    (tmp_path / "sparsekit_broken_pkg.py").write_text("import sparsekit_absent_inner_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        require("sparsekit_broken_pkg", "things")
    assert not isinstance(raised.value, MissingExtra) and raised.value.name == "sparsekit_absent_inner_dependency"


def test_the_screenshot_call_without_selenium_names_the_screenshot_extra(tmp_path):
    error = library_error(["selenium"], f"""
            from sparsekit.analysis.dashboard import save_screenshot
            save_screenshot({str(tmp_path / 'page.html')!r}, {str(tmp_path / 'page.png')!r})""")
    assert error == {"type": "MissingExtra", "import_error": True, "extra": "screenshot", "package": "selenium",
                     "message": "sparsekit dashboard --screenshot needs selenium: pip install 'sparsekit[screenshot]'"}


@pytest.mark.parametrize("missing, call, message", [
    (["transformer_lens"], "from sparsekit.activations.lm import load_lm; load_lm(cache_dir=sys.argv[1])",
     "load_lm needs transformer-lens: pip install 'sparsekit[lens]'"),
    (["transformer_lens"], "from sparsekit.activations.lm import smollm2_hooked_config; smollm2_hooked_config()",
     "load_lm needs transformer-lens: pip install 'sparsekit[lens]'"),
    (["gguf"], "from sparsekit.activations.lm import load_smollm2_transformers; load_smollm2_transformers()",
     "load_lm (reading SmolLM2's GGUF file) needs gguf: pip install 'sparsekit[lens]'"),
    (["transformer_lens"], "from sparsekit.toys.sparse_base_model import SparseBaseConfig, build_model; "
                           "build_model(SparseBaseConfig(), 10)",
     "the sparse-base toy (sparsekit toys sparse-base) needs transformer-lens: pip install 'sparsekit[lens]'"),
])
def test_lm_paths_without_their_packages_name_the_lens_extra(missing, call, message, tmp_path):
    hide = "".join(f"sys.modules[{m!r}] = None\n" for m in missing)
    code = textwrap.dedent(f"""
        import json
        from sparsekit._util.extras import MissingExtra
        try:
            {call}
        except MissingExtra as e:
            print(json.dumps({{"message": str(e), "extra": e.extra}}))
        """)
    result = subprocess.run([sys.executable, "-c", "import sys\n" + hide + code, str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"message": message, "extra": "lens"}


def command_without(modules, *argv) -> subprocess.CompletedProcess:
    return run_without(modules, "from sparsekit.cli import main\nmain(sys.argv[1:])", *argv)


def assert_one_line_exit_2(result, message):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.strip().splitlines() == [message]


def test_dashboard_screenshot_command_without_selenium_prints_one_line_and_exits_2(tmp_path):
    from sparsekit.analysis.dashboard import save_report
    save_report({"model": "m", "hook": "h", "architecture": "topk", "n_latents": 1, "census": {}, "features": []},
                 tmp_path, "sae")
    result = command_without(["selenium"], "dashboard", str(tmp_path), "--screenshot", str(tmp_path / "shot.png"))
    assert_one_line_exit_2(result, "sparsekit dashboard --screenshot needs selenium: pip install 'sparsekit[screenshot]'")
    assert not (tmp_path / "dashboard.html").exists()  # refused before any work
    # Without --screenshot selenium is not needed.
    assert command_without(["selenium"], "dashboard", str(tmp_path)).returncode == 0


def test_lm_demo_command_without_transformer_lens_prints_one_line_and_exits_2(tmp_path):
    result = command_without(["transformer_lens"], "lm-demo", "--out", str(tmp_path / "run"))
    assert_one_line_exit_2(result, "load_lm needs transformer-lens: pip install 'sparsekit[lens]'")


def test_toys_sparse_base_command_without_transformer_lens_prints_one_line_and_exits_2(tmp_path):
    result = command_without(["transformer_lens"], "toys", "sparse-base", "--out", str(tmp_path / "run"),
                             "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_exit_2(result, "the sparse-base toy (sparsekit toys sparse-base) needs transformer-lens: "
                                   "pip install 'sparsekit[lens]'")
