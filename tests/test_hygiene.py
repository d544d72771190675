"""The suite leaves nothing running: conftest's nothing_left_running fails a test that leaves a process, a listening
port or a temporary file behind, and ends or removes what was left. Checked here on an inner pytest run of tests
that leak each on purpose, with the repo's own conftest fixtures."""
import os

import psutil

pytest_plugins = "pytester"
HERE = os.path.dirname(os.path.abspath(__file__))

INNER_CONFTEST = f"""
import importlib.util, sys
sys.path[:0] = [{os.path.dirname(HERE)!r}, {HERE!r}]
spec = importlib.util.spec_from_file_location("repo_conftest", {os.path.join(HERE, "conftest.py")!r})
repo_conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repo_conftest)
scratch_tmpdir, nothing_left_running = repo_conftest.scratch_tmpdir, repo_conftest.nothing_left_running
"""

INNER_TESTS = """
import os, socket, subprocess, sys, tempfile
SOCKETS = []

def test_leaves_a_process(tmp_path_factory):
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"])
    with open(os.environ["PID_FILE"], "w") as f:
        f.write(str(child.pid))

def test_leaves_a_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    SOCKETS.append(s)

def test_leaves_a_temporary_folder():
    tempfile.mkdtemp()

def test_cleans_up():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    with tempfile.TemporaryDirectory() as folder:
        open(os.path.join(folder, "x"), "w").close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
"""


def test_a_test_that_leaves_a_process_a_port_or_a_temporary_file_fails(pytester, tmp_path, monkeypatch):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    monkeypatch.setenv("PID_FILE", str(tmp_path / "pid"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=4, errors=3)  # each leak fails its test at teardown
    output = result.stdout.str()
    assert "processes still running (killed now)" in output and "time.sleep(120)" in output
    assert "ports still listening" in output and "left in TMPDIR (removed now): tmp" in output
    pid = int((tmp_path / "pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(120)" in " ".join(p.info["cmdline"] or [])
                and "subprocess.Popen" not in " ".join(p.info["cmdline"] or [])]  # the grandchild too
