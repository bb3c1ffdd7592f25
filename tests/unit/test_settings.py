"""Settings: parsing, validation, defaults, and the adaptive sizing rule."""
import os

import pytest

from mpumap import settings as S
from mpumap import sizing
from mpumap.sizing import cgroup_memory


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("64K", 65536), ("64k", 65536), ("2M", 2 << 20), ("1G", 1 << 30),
    ("256MiB", 256 << 20), ("3 KB", 3072),
])
def test_parse_size(text, value):
    assert S.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "-1", "1.5M", "12Q"])
def test_parse_size_refuses(text):
    with pytest.raises(S.SettingError):
        S.parse_size(text)


def test_page_size_must_be_a_multiple_of_the_system_page():
    assert S.parse_page_size("64K") == 65536
    for bad in ("1000", "0", "6K" if S.SYSTEM_PAGE_SIZE == 4096 else "1"):
        with pytest.raises(S.SettingError, match="multiple"):
            S.parse_page_size(bad)


def test_buffer_size_in_pages_or_bytes():
    assert S.parse_buffer_pages("100", 65536) == 100
    assert S.parse_buffer_pages("16M", 65536) == 256
    with pytest.raises(S.SettingError):
        S.parse_buffer_pages("1K", 65536)


def test_settings_validation():
    with pytest.raises(S.SettingError, match="watermarks"):
        S.Settings(high_water=70, low_water=70)
    with pytest.raises(S.SettingError, match="too small"):
        S.Settings(buffer_pages=3, fillers=2)
    assert S.Settings(buffer_pages=6, fillers=2).buffer_pages == 6
    assert S.Settings().adaptive


def test_default_read_ahead_is_a_megabyte_within_the_buffer():
    assert S.Settings(page_size=4096).read_ahead == 255
    assert S.Settings(page_size=65536).read_ahead == 15
    assert S.Settings(page_size=2 << 20).read_ahead == 0
    assert S.Settings(page_size=4096, buffer_pages=100).read_ahead == 24
    assert S.Settings(page_size=4096, buffer_pages=6, fillers=2).read_ahead == 0
    assert S.Settings(page_size=4096, read_ahead=7).read_ahead == 7


def test_socket_path_order(monkeypatch):
    monkeypatch.delenv("MPUMAP_SOCKET", raising=False)
    assert S.socket_path() == S.DEFAULT_SOCKET
    monkeypatch.setenv("MPUMAP_SOCKET", "/tmp/env.sock")
    assert S.socket_path() == "/tmp/env.sock"
    assert S.socket_path("/tmp/flag.sock") == "/tmp/flag.sock"


def test_adaptive_limit_counts_what_the_buffer_holds():
    page, MiB, GiB = 1 << 20, 1 << 20, 1 << 30
    total = 24 * GiB
    # 1 GiB available, 256 MiB reserve, nothing held: 768 pages
    assert sizing.adaptive_limit(0, page, GiB, total, None, 256 * MiB, 10) == 768
    # holding 500 pages, which the kernel no longer counts as available
    assert sizing.adaptive_limit(500, page, GiB, total, None, 256 * MiB, 10) == 1268
    # a cgroup of 1 GiB using 700 MiB, 200 of them the buffer's: 1024 - 500 - 256
    assert sizing.adaptive_limit(200, page, 8 * GiB, total, (GiB, 700 * MiB), 256 * MiB, 10) == 268
    # ... and if the buffer's pages are charged elsewhere, the cgroup's limit
    # still bounds it
    assert sizing.adaptive_limit(600, page, 8 * GiB, total, (GiB, 50 * MiB), 256 * MiB, 10) == 768
    # never below the minimum, even when memory is short
    assert sizing.adaptive_limit(0, page, 100 * MiB, total, None, 256 * MiB, 10) == 10
    # the default reserve follows the memory there is: RAM, or a tighter cgroup
    expected = (GiB - GiB // 10) // MiB
    assert sizing.adaptive_limit(0, page, 8 * GiB, total, (GiB, 0), None, 10) == expected == 921
    assert sizing.default_reserve(24 * GiB) == (24 * GiB) // 10
    assert sizing.default_reserve(GiB) == GiB // 10
    assert sizing.default_reserve(128 * MiB) == 32 * MiB


def test_cgroup_room_takes_the_tightest_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:memory:/a/b\n0::/x\n")
    mem = tmp_path / "memory"
    (mem / "a" / "b").mkdir(parents=True)
    (mem / "a" / "b" / "memory.limit_in_bytes").write_text(str(1 << 62) + "\n")
    (mem / "a" / "b" / "memory.usage_in_bytes").write_text("100\n")
    (mem / "a" / "memory.limit_in_bytes").write_text("1000\n")
    (mem / "a" / "memory.usage_in_bytes").write_text("400\n")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "memory.max").write_text("max\n")
    (tmp_path / "x" / "memory.current").write_text("5\n")
    assert cgroup_memory(str(proc), str(tmp_path)) == (1000, 400)
    proc.write_text("0::/x\n")
    assert cgroup_memory(str(proc), str(tmp_path)) is None


def test_every_spec_parses_its_default_and_refuses_nonsense():
    for spec in S.SPECS:
        if spec.default not in (None, ()) and spec.parse is not str:
            text = oct(spec.default) if spec.name == "socket_mode" else str(spec.default)
            if not spec.multiple and not isinstance(spec.default, tuple):
                assert spec.parse(text) == spec.default, spec.name
        if spec.name not in ("socket", "pidfile"):  # paths: any text may be one
            with pytest.raises(S.SettingError):
                spec.parse("nonsense!")
    with pytest.raises(S.SettingError, match="107 bytes"):
        S.SPEC["socket"].parse("/tmp/" + "x" * 200)


def test_settings_are_the_specs():
    fields = [f.name for f in S.dataclasses.fields(S.Settings)]
    assert fields == [spec.name for spec in S.SPECS]
    s = S.Settings(buffer_pages=S.parse_buffer_size("1M"), page_size=65536)
    assert s.buffer_pages == 16 and not s.adaptive
    with pytest.raises(S.dataclasses.FrozenInstanceError):
        s.fillers = 3
    given = {"fillers": 2, "allow_uids": (), "cpus": None, "worker_timeout": 2.5}
    assert S.Settings.from_options(given).worker_timeout == 2.5


def test_the_status_tells_no_allow_lists_or_pidfile():
    public = S.Settings(allow_uids=(5,), pidfile="/run/x.pid", cpus=(0,)).public()
    assert "allow_uids" not in public and "pidfile" not in public
    assert public["cpus"] == [0] and public["adaptive"] is True
    assert {"socket", "page_size", "high_water", "low_water", "worker_timeout"} <= set(public)
    import json

    json.dumps(public)


def test_the_readme_table_is_the_specs():
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme) as f:
        text = f.read()
    begin = "<!-- settings table: generated by python -m mpumap.settings --markdown -->\n"
    end = "\n<!-- end of settings table -->"
    assert begin in text and end in text, "the README lost its table's markers"
    table = text[text.index(begin) + len(begin):text.index(end)]
    assert table == S.markdown_table(), (
        "README.md's settings table is not what the specs say: paste the output of "
        "python -m mpumap.settings --markdown between its markers")
