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
