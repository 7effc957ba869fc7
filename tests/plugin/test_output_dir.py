"""A MacDrop run's output dir, through `llamafactory-cli train`: a second run on a folder a live run
writes to is refused in one line before anything loads, and runs again once that run is gone; a
read-only or full disk is one line before anything loads; the locator file is written atomically
(a disk that fills up after the load leaves no cut file behind, one line instead of a traceback)
and never through a symlink placed at its name.

The read-only and full disks are real: a read-only bind mount and a small tmpfs in a private mount
namespace (``unshare -rm``), so nothing outside the test changes.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml
from helpers import tiny
from helpers.process import BIN, run_cli

pytestmark = pytest.mark.slow

LOADING = ("loading configuration file", "Loading dataset", "Loading weights")
ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def write_yaml(cfg, path):
    path.write_text(yaml.safe_dump(cfg))
    return path


def macdrop_errors(proc):
    return [line for line in proc.stderr.splitlines() if "[macdrop] error" in line]


def assert_one_line_before_loading(proc, message):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert macdrop_errors(proc) == [f"[macdrop] error: {message}"]
    assert "Traceback" not in proc.stderr
    assert not any(word in proc.stdout + proc.stderr for word in LOADING)


def test_a_second_run_on_a_live_runs_output_dir_is_refused(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    long_run = write_yaml(
        tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, max_steps=100000, gradient_accumulation_steps=1),
        tmp_path / "long.yaml",
    )
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [str(BIN / "llamafactory-cli"), "train", str(long_run)],
        cwd=tmp_path,
        env={**os.environ, **ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 300
        while "MacDrop on" not in (tmp_path / "first.log").read_text() and time.time() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        assert (out / "macdrop_run.lock").is_file()
        second = run_cli(["llamafactory-cli", "train", str(long_run)], cwd=tmp_path, env_extra=ENV)
        (line,) = macdrop_errors(second)
        assert line.startswith(
            f"[macdrop] error: output_dir {out} is in use by another MacDrop run (pid {first.pid} on "
        )
        assert line.endswith(
            "two runs on one output_dir mix their checkpoints; wait for it to end, or give another output_dir"
        )
        assert second.returncode == 2
        assert not any(word in second.stdout + second.stderr for word in LOADING)
        assert first.poll() is None  # the first run trains on
    finally:
        first.send_signal(signal.SIGKILL)  # dies without cleaning up: the kernel releases the lock
        first.wait()
        log.close()
    assert (out / "macdrop_run.lock").is_file()  # left behind by the killed run
    short = write_yaml(
        tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, max_steps=1, gradient_accumulation_steps=1),
        tmp_path / "short.yaml",
    )
    third = run_cli(["llamafactory-cli", "train", str(short)], cwd=tmp_path, env_extra=ENV)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert (out / "macdrop_locator.json").is_file()
    assert not (out / "macdrop_run.lock").exists()  # removed by the run that held it


def in_namespace(script: str, tmp_path, timeout=600):
    """``script`` (sh) in a private mount namespace, as root there; skipped where the kernel forbids it."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged mount namespaces here: {probe.stderr.decode().strip()}")
    env = {**os.environ, **ENV}
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_read_only_and_full_output_dirs_are_refused_before_loading(config_only_dir, tiny_data_dir, tmp_path):
    cli = BIN / "llamafactory-cli"
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    ro_yaml = write_yaml(tiny.lf_train_args(config_only_dir, tiny_data_dir, ro / "out"), tmp_path / "ro.yaml")
    full_yaml = write_yaml(tiny.lf_train_args(config_only_dir, tiny_data_dir, full / "out"), tmp_path / "full.yaml")
    read_only = in_namespace(
        f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && exec {cli} train {ro_yaml}", tmp_path
    )
    assert_one_line_before_loading(
        read_only,
        f"output_dir {ro / 'out'} cannot be created (Read-only file system)",
    )
    filled = in_namespace(
        f"mount -t tmpfs -o size=64k tmpfs {full} && mkdir {full}/out && (cat /dev/zero > {full}/fill 2>/dev/null; "
        f"true) && exec {cli} train {full_yaml}",
        tmp_path,
    )
    assert_one_line_before_loading(
        filled,
        f"output_dir {full / 'out'} is not writable (No space left on device): MacDrop writes macdrop_locator.json "
        "there at the first step, and LLaMA-Factory its checkpoints; give a writable folder with free space",
    )


def test_a_disk_that_fills_after_loading_leaves_no_cut_locator_file(tiny_llama_dir, tiny_data_dir, tmp_path):
    """The disk fills between the pre-load check and the first step (a filler starts once the run
    holds the folder): the locator file cannot be written, which is one line, and nothing half
    written is left for a resume to read."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    cfg = write_yaml(
        tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, max_steps=2, gradient_accumulation_steps=1),
        tmp_path / "run.yaml",
    )
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {disk} && "
        f"( while [ ! -e {out}/macdrop_run.lock ]; do sleep 0.05; done; cat /dev/zero > {disk}/fill 2>/dev/null ) & "
        f"{BIN / 'llamafactory-cli'} train {cfg}; rc=$?; wait; ls -a {out}; exit $rc"
    )
    proc = in_namespace(script, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert macdrop_errors(proc) == [
        f"[macdrop] error: cannot write {out / 'macdrop_locator.json'} (No space left on device)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Loading weights" in proc.stdout + proc.stderr  # it did fail after the load
    listing = proc.stdout.split()
    assert "macdrop_locator.json" not in listing  # no cut file
    assert not [name for name in listing if name.endswith(".tmp")]  # and no temporary one


def test_the_locator_file_is_never_written_through_a_symlink(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("the user's own file\n")
    (out / "macdrop_locator.json").symlink_to(outside)
    cfg = write_yaml(
        tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, max_steps=1, gradient_accumulation_steps=1),
        tmp_path / "run.yaml",
    )
    proc = run_cli(["llamafactory-cli", "train", str(cfg)], cwd=tmp_path, env_extra=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert outside.read_text() == "the user's own file\n"
    locator = out / "macdrop_locator.json"
    assert not locator.is_symlink()
    assert json.loads(locator.read_text())["layer"] == tiny.PLANTED_LAYER
    assert oct(locator.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would have made it


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def config_only_dir(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("config_only")
    shutil.copy(tiny_llama_dir / "config.json", folder / "config.json")
    return folder
