"""A region's memfd: named after its file, whatever the file's name."""
import os

import pytest

from mpumap.region import memfd_name


@pytest.mark.parametrize("name", ["/d/" + "é" * 127, "/d/" + "日" * 85, "/d/" + "a" * 300,
                                  "/d/plain.bin"])
def test_a_regions_memfd_takes_any_file_name(name):
    fd = os.memfd_create(memfd_name(name))  # EINVAL past the kernel's 249 bytes
    os.close(fd)
    assert memfd_name(name).startswith("mpumap:" + os.path.basename(name)[:10])
