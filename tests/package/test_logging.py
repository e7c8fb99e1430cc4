"""Library messages go through the "sparsekit" logger: seen on stderr without any set-up, silenced or
redirected the usual way, and handed to the application's handlers when it configured logging."""
import subprocess
import sys

import pytest

from sparsekit.errors import NoValidCheckpoint


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_message_reaches_stderr_with_no_logging_configured():
    result = run("from sparsekit._util.log import logger; logger.info('resumed from %s', 'x/step_1')")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "sparsekit: resumed from x/step_1" and result.stdout == ""


def test_level_set_on_the_sparsekit_logger_silences_info():
    result = run("import logging; logging.getLogger('sparsekit').setLevel(logging.WARNING)\n"
                 "from sparsekit._util.log import logger; logger.info('quiet'); logger.warning('loud')")
    assert "quiet" not in result.stderr and "sparsekit: loud" in result.stderr


def test_messages_can_be_routed_through_the_applications_root_handlers_once():
    result = run("import logging, sys\n"
                 "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='APP %(name)s %(message)s')\n"
                 "from sparsekit._util.log import logger; logger.info('first')\n"
                 "log = logging.getLogger('sparsekit'); log.handlers.clear(); log.propagate = True\n"
                 "logger.warning('skipping corrupt checkpoint')")
    assert result.stdout.splitlines() == ["APP sparsekit skipping corrupt checkpoint"]
    assert result.stderr.strip().splitlines()[-1] == "sparsekit: first" and "skipping" not in result.stderr


def test_corrupt_checkpoint_is_reported_as_a_warning(tmp_path, capsys):
    from sparsekit.training import checkpoint
    bad = tmp_path / f"{checkpoint.PREFIX}000000001"
    bad.mkdir()
    (bad / checkpoint.STATE_JSON).write_text("{not json")
    with pytest.raises(NoValidCheckpoint, match="none of the 1 checkpoint"):
        checkpoint.latest(tmp_path)
    assert "sparsekit: skipping invalid checkpoint" in capsys.readouterr().err
