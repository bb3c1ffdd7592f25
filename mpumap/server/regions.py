"""The server's table of regions: which store objects it serves, in which
slots, for whom."""
import collections
import logging

from mpumap.pbm import RegionSlots
from mpumap.region import Region

log = logging.getLogger("mpumap.regions")


class RegionTable:
    """Every region the server serves.

    Owns the regions, and through them their memfds and store descriptors,
    keyed by (device, inode, uid) for files and (url, identity, uid) for
    objects: users never share a region
    (a client could plant bytes in one it maps, see DESIGN.md).  Owns the
    free region slots, reused oldest-freed first, so that a message that
    outlived a slot's region (the slot's generation tells them apart in any
    case) is long gone when the slot serves again.

    Invariants: a region is here while a client mapping refers to it
    (`region.mappings` > 0), and its slot is not free meanwhile;
    `per_user[uid]` counts the regions keyed with that uid.
    """

    def __init__(self, buffer, page_size):
        self.buffer = buffer
        self.page_size = page_size
        self._regions = {}  # key -> Region
        self.slots = RegionSlots(buffer.max_regions)  # what the C side sees of them
        self._free_slots = collections.deque(range(buffer.max_regions))
        self.per_user = collections.Counter()
        self.stalled = {}  # a hung store's file (key[:2]) -> pids of workers caught in it

    def __len__(self):
        return len(self._regions)

    def __iter__(self):
        return iter(list(self._regions.values()))

    def get(self, key):
        return self._regions.get(key)

    @property
    def full(self):
        return not self._free_slots

    def create(self, key, rid, size, page_size, store_fd, store_mode, name, url=None,
               identity=None):
        """A new region in a free slot (the caller checked there is one);
        takes over store_fd."""
        slot = self._free_slots.popleft()
        try:
            region = Region.create(key, rid, slot, size, page_size, store_fd, store_mode, name,
                                   url, identity)
        except BaseException:
            self._free_slots.appendleft(slot)
            raise
        self.buffer.open_region(slot, region.gen, region.npages)
        if key[:2] in self.stalled:
            self.buffer.stall_region(slot, region.gen)
        self.slots.set(region)
        self._regions[key] = region
        self.per_user[region.uid] += 1
        log.debug("region %d: %s, %d bytes, %d pages (uid %d)", rid, name, size,
                 region.npages, region.uid)
        return region

    def release(self, region):
        """Forget a region whose last mapping went: its pages go back to the
        buffer, its descriptors are closed (the workers close theirs when
        told), and its slot is free again, last in line."""
        del self._regions[region.key]
        self.per_user[region.uid] -= 1
        if not self.per_user[region.uid]:
            del self.per_user[region.uid]
        self.buffer.release_region(region.slot, region.gen)
        self.slots.clear(region.slot)
        region.close()
        self._free_slots.append(region.slot)
        log.debug("region %d released", region.rid)

    def set_write_fd(self, region, fd):
        """The file to write the region's dirty pages back to (taken over)."""
        region.set_write_fd(fd)
        self.slots.array[region.slot].write_fd = fd

    def other_user(self, key, writable):
        """Another user's region of the same file that cannot share it with
        this one: one mapped for writing, or any when this one writes."""
        if len(key) != 3 or not isinstance(key[1], int):
            return None  # (an object: read-only)
        dev, ino, uid = key
        for region in self._regions.values():
            k = region.key
            if len(k) == 3 and k[:2] == (dev, ino) and k[2] != uid \
                    and (writable or region.write_fd >= 0):
                return region
        return None

    def stall_store_of(self, worker):
        """The region whose store a hung worker is caught in, stalled: its
        faults on pages the buffer does not hold get SIGBUS, its write-backs
        fail (EIO: the pages are dropped).  Its file too: a region made for
        it again is stalled from the start, while the worker lives (see
        worker_ended).  None when the worker was in no region's store."""
        busy = self.buffer.in_store(worker.heartbeat_slot)
        region = next((r for r in self._regions.values() if busy == (r.slot, r.gen)), None)
        if region is None:
            return None
        self.buffer.stall_region(region.slot, region.gen)
        self.stalled.setdefault(region.key[:2], set()).add(worker.pid)
        return region

    def worker_ended(self, pid, by_itself):
        """A worker that was caught in a store ended: a new map of its file
        tries the store again.  If it ended `by_itself` (SIGKILL could not
        end it: the store answered at last, or its connection went), the
        file's regions read and write it again too; else they stay stalled
        (pages a client was refused stay refused in that mapping)."""
        for store, pids in list(self.stalled.items()):
            pids.discard(pid)
            if pids:
                continue
            del self.stalled[store]
            for region in self._regions.values() if by_itself else ():
                if region.key[:2] == store:
                    self.buffer.stall_region(region.slot, region.gen, False)
                    log.warning("region %d (%s): its store answers again", region.rid,
                                region.name)

    def recover(self, pid):
        """Free the pages a dead worker held FILLING or LEAVING."""
        return self.buffer.recover(pid, self.slots, self.page_size)

    def present(self, region):
        """Pages of the region PRESENT now."""
        return self.buffer.region_present(region.slot)
