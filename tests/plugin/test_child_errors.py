"""plugin/child_errors.py in processes of its own, in about a second: one writer wins and nothing
is torn, the watcher ends a process that waits but leaves one ending by itself, and without the
launcher's file one line per job. The real torchrun paths: tests/plugin/test_trainer_loop.py."""

import os
import subprocess
import sys
import time

from helpers.process import REPO

from llamafactory_macdrop.plugin import child_errors

RACE = """
import sys, time
from llamafactory_macdrop.plugin import child_errors
until = float(sys.argv[1])
while time.time() < until:
    pass
print(child_errors.record(sys.argv[2], sys.argv[3] * 20000))
"""


def _python(code, *args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_first_rank_to_record_wins_and_no_message_is_torn(tmp_path):
    path = tmp_path / "error.txt"
    path.write_text("")  # as the launcher's mkstemp leaves it
    start = time.time() + 1.0  # all four leave the starting line together
    procs = [_python(RACE, str(start), str(path), letter) for letter in "abcd"]
    won = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(won) == ["False", "False", "False", "True"]
    text = child_errors.read(str(path))
    assert len(text) == 20000
    assert len(set(text)) == 1
    assert text[0] == "abcd"[won.index("True")]
    child_errors.discard(str(path))
    assert list(tmp_path.iterdir()) == []


WAITS = """
import os, sys, time
from llamafactory_macdrop.plugin import child_errors
assert child_errors.start_watcher(poll=0.02, grace={grace}, ending_limit=60)
print("watching", flush=True)
while os.path.getsize(os.environ[child_errors.ERROR_FILE_ENV]) == 0:
    time.sleep(0.01)
if {ends_itself}:
    child_errors.report("my own error too")  # a rank that raised the same error: its clean end
    time.sleep(1.0)
    sys.exit(3)
time.sleep(60)  # waits, as in a collective for a rank that has gone
"""


def _watched(tmp_path, grace, ends_itself):
    path = tmp_path / "error.txt"
    path.write_text("")
    proc = _python(
        WAITS.format(grace=grace, ends_itself=ends_itself), env_extra={child_errors.ERROR_FILE_ENV: str(path)}
    )
    assert proc.stdout.readline().strip() == "watching"
    start = time.monotonic()
    assert child_errors.record(str(path), "planted: another rank")
    proc.wait(timeout=30)
    return proc.returncode, time.monotonic() - start, child_errors.read(str(path))


def test_the_watcher_ends_a_process_that_waits_once_another_rank_recorded_its_error(tmp_path):
    code, seconds, message = _watched(tmp_path, grace=0.2, ends_itself=False)
    assert code == 0
    assert seconds < 10
    assert message == "planted: another rank"


def test_the_watcher_leaves_a_process_that_ends_by_itself(tmp_path):
    code, seconds, message = _watched(tmp_path, grace=0.2, ends_itself=True)
    assert code == 3
    assert seconds > 1.0  # its own exit, after the grace had passed
    assert message == "planted: another rank"  # the first writer's message stays


def test_without_the_launcher_the_first_failing_rank_of_a_job_prints_the_line(tmp_path):
    code = "from llamafactory_macdrop.plugin import child_errors\nraise SystemExit(child_errors.report('boom'))"
    job = {
        "TORCHELASTIC_RUN_ID": "none",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": f"test{os.getpid()}",
        "TMPDIR": str(tmp_path),
        child_errors.ERROR_FILE_ENV: "",
    }
    results = [_python(code, env_extra=job).communicate(timeout=60) for _ in range(2)]  # same parent: one job
    assert [err.strip() for _, err in results] == ["[macdrop] error: boom", ""]
    later = {**job, "TORCHELASTIC_RESTART_COUNT": "1"}  # a restarted attempt speaks again
    assert _python(code, env_extra=later).communicate(timeout=60)[1].strip() == "[macdrop] error: boom"
