"""When a store that hung a worker is tried again (regions.Stalls)."""
from mpumap.server.regions import STALL_RETRY_MOST, Stalls


def test_a_store_is_stalled_while_a_worker_caught_in_it_lives():
    stalls = Stalls(first=10)
    stalls.caught("nfs", 1)
    stalls.caught("nfs", 2)
    assert stalls.stalled("nfs") and not stalls.stalled("disk")
    assert stalls.ended(1, True, 0) == set()  # the other is still caught
    assert stalls.ended(7, True, 0) == set()  # a worker caught in nothing
    assert stalls.stalled("nfs")


def test_a_worker_that_ends_by_itself_frees_its_store_at_once():
    stalls = Stalls(first=10)
    stalls.caught("fuse", 1)
    assert stalls.ended(1, True, 5) == {"fuse"}
    assert not stalls.stalled("fuse") and stalls.due(10**6) == set()


def test_a_killed_worker_frees_its_store_after_a_wait_that_doubles():
    stalls = Stalls(first=10)
    stalls.caught("nfs", 1)
    assert stalls.ended(1, False, 100) == set()  # killed: the store may hang still
    assert stalls.stalled("nfs") and stalls.due(109) == set()
    assert stalls.due(110) == {"nfs"} and not stalls.stalled("nfs")
    stalls.caught("nfs", 2)  # it hung again
    stalls.ended(2, False, 200)
    assert stalls.due(219) == set() and stalls.due(220) == {"nfs"}
    for pid in range(3, 40):
        stalls.caught("nfs", pid)
        stalls.ended(pid, False, 0)
        stalls.due(10**9)
    stalls.caught("nfs", 40)
    stalls.ended(40, False, 0)
    assert stalls.due(STALL_RETRY_MOST - 1) == set() and stalls.due(STALL_RETRY_MOST) == {"nfs"}
    # A worker that ends by itself says the store answers: the next wait is short again.
    stalls.caught("nfs", 41)
    stalls.ended(41, True, 0)
    stalls.caught("nfs", 42)
    stalls.ended(42, False, 0)
    assert stalls.due(10) == {"nfs"}


def test_workers_caught_at_once_are_one_hang():
    stalls = Stalls(first=10)
    for pid in (1, 2, 3):
        stalls.caught("nfs", pid)
    for pid in (1, 2, 3):
        stalls.ended(pid, False, 0)
    assert stalls.due(9) == set() and stalls.due(10) == {"nfs"}


def test_a_hang_while_waiting_to_try_again_stalls_until_that_worker_ends():
    stalls = Stalls(first=10)
    stalls.caught("nfs", 1)
    stalls.ended(1, False, 0)
    stalls.caught("nfs", 2)
    assert stalls.due(10**6) == set() and stalls.stalled("nfs")
    assert stalls.ended(2, True, 0) == {"nfs"}


def test_a_store_that_serves_for_an_hour_after_its_retry_is_forgiven():
    stalls = Stalls(first=10)
    for pid, at in ((1, 0), (2, 100)):
        stalls.caught("nfs", pid)
        stalls.ended(pid, False, at)
        assert stalls.due(at + 10 * pid) == {"nfs"}  # 10 s, then 20 s
    # Hanging again within the hour: the wait doubles on.
    stalls.caught("nfs", 3)
    stalls.ended(3, False, 200)
    assert stalls.due(239) == set() and stalls.due(240) == {"nfs"}
    # An hour without a hang since it was tried again: the next wait is the first.
    assert stalls.due(240 + STALL_RETRY_MOST) == set()
    stalls.caught("nfs", 4)
    stalls.ended(4, False, 5000)
    assert stalls.due(5010) == {"nfs"}
