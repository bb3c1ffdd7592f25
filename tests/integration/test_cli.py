"""The server's command line: help, and bad settings refused in one line."""
import os
import subprocess
import sys

import pytest


def test_server_help_explains_every_setting():
    out = subprocess.run([sys.executable, "-m", "mpumap.cli", "--help"],
                         capture_output=True, text=True, timeout=30).stdout
    for flag, env in [("--page-size", "UMAP_PAGESIZE"), ("--buffer-size", "UMAP_BUFSIZE"),
                      ("--fillers", "UMAP_PAGE_FILLERS"), ("--evictors", "UMAP_PAGE_EVICTORS"),
                      ("--high-water", "UMAP_EVICT_HIGH_WATER_THRESHOLD"),
                      ("--low-water", "UMAP_EVICT_LOW_WATER_THRESHOLD"),
                      ("--adapt-interval", "UMAP_BUFADAPT_FREQ"), ("--socket", "MPUMAP_SOCKET")]:
        assert flag in out and env in out


@pytest.mark.parametrize("args,env,message", [
    (["--page-size", "1000"], {}, "multiple of the system page size"),
    (["--fillers", "0"], {}, "between 1 and"),
    (["--bogus"], {}, "No such option"),
    (["--high-water", "50", "--low-water", "60"], {}, "watermarks"),
    ([], {"UMAP_PAGESIZE": "12345"}, "UMAP_PAGESIZE"),
    (["--buffer-size", "lots"], {}, "not a size"),
    (["--buffer-size", "2", "--fillers", "2"], {}, "too small"),
    (["--spin", "-1"], {}, "--spin"),
    ([], {"UMAP_SPIN_US": "forever"}, "UMAP_SPIN_US"),
])
def test_bad_settings_fail_in_one_line(args, env, message):
    proc = subprocess.run([sys.executable, "-m", "mpumap.cli", "--socket", "/tmp/unused.sock",
                           *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists("/tmp/unused.sock")


def test_a_socket_path_that_is_a_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("someone's notes\n")
    proc = subprocess.run([sys.executable, "-m", "mpumap.cli", "--socket", str(path),
                           "--buffer-size", "8M"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "is not a socket" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert path.read_text() == "someone's notes\n"


def client_run(*args, cwd=None):
    code = "from mpumap.cli import client_main; client_main()"
    return subprocess.run([sys.executable, "-c", code, "run", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_run_refuses_a_bad_pattern_and_a_command_it_cannot_run(start_server, tmp_path):
    server = start_server("--buffer-size", "8M")
    proc = client_run("--socket", server.socket, "--map", "a:b", "--", "true")
    assert proc.returncode == 2 and "--map" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    script = tmp_path / "no-shebang"
    script.write_bytes(b"\x7fELF but not a program\n")
    script.chmod(0o755)
    proc = client_run("--socket", server.socket, "--", str(script))
    assert proc.returncode == 126, proc.stderr
    assert proc.stderr.strip() == f"mpumap-client: {script}: Exec format error", proc.stderr
