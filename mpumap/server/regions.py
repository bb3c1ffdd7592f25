"""The server's table of regions: which store objects it serves, in which
slots, for whom."""
import collections
import logging

from mpumap.pbm import RegionSlots
from mpumap.region import Region

log = logging.getLogger("mpumap.regions")

STALL_RETRY_FIRST = 120.0  # seconds a store that hung waits to be tried again ...
STALL_RETRY_MOST = 3600.0  # ... doubling each time it hangs again, up to this
RELEASED_KEPT = 256  # regions released lately whose store a hung worker may still name


class Stalls:
    """The stores (a file: its key[:2]) that hung a worker past
    --worker-timeout, and when each is tried again.

    Owns, per store: the pids of the workers caught in it that have not
    ended, when it is tried again, and how many times it hung.  A store is
    stalled while a worker caught in it lives, and after the last one
    ended, until its retry time: at once if that worker ended by itself
    (SIGKILL could not end it, so its read or write came back: the store
    answers), else `first` seconds after, doubled for each time the store
    hung before (up to STALL_RETRY_MOST), since a killed worker says
    nothing of the store.  Workers caught in it at once are one hang.  A
    store tried again that hangs no worker for STALL_RETRY_MOST is
    forgiven: its hangs are forgotten (a mount that failed once last week
    waits `first` again, not an hour).  Pure bookkeeping: RegionTable
    applies it.
    """

    def __init__(self, first=STALL_RETRY_FIRST):
        self.first = first
        self._caught = {}  # store -> set of pids
        self._retry_at = {}  # store -> monotonic seconds
        self._hangs = collections.Counter()  # store -> times it hung
        self._tried = {}  # store -> when it was tried again, until forgiven

    def stalled(self, store):
        return store in self._caught or store in self._retry_at

    def caught(self, store, pid):
        if store not in self._caught:
            self._hangs[store] += 1
        self._caught.setdefault(store, set()).add(pid)
        self._retry_at.pop(store, None)
        self._tried.pop(store, None)

    def ended(self, pid, by_itself, now):
        """The stores tried again now that worker `pid` ended."""
        again = set()
        for store, pids in list(self._caught.items()):
            if pid not in pids:
                continue
            pids.discard(pid)
            if pids:
                continue
            del self._caught[store]
            if by_itself:
                del self._hangs[store]
                again.add(store)
            else:
                wait = self.first * 2 ** min(self._hangs[store] - 1, 32)
                self._retry_at[store] = now + min(wait, STALL_RETRY_MOST)
        return again

    def due(self, now):
        """The stores whose retry time came."""
        again = {store for store, when in self._retry_at.items() if now >= when}
        for store in again:
            del self._retry_at[store]
            self._tried[store] = now
        for store, when in list(self._tried.items()):
            if now - when >= STALL_RETRY_MOST:
                del self._tried[store]
                del self._hangs[store]
        return again


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
        self.stalls = Stalls()
        self._released = collections.OrderedDict()  # (slot, gen) -> (store, name), lately

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
        if self.stalls.stalled(key[:2]):
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
        self._released[region.slot, region.gen] = (region.key[:2], region.name)
        if len(self._released) > RELEASED_KEPT:
            self._released.popitem(last=False)
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

    def stall(self, busy, pid):
        """A worker (pid) hung in the store of region `busy` ((slot,
        generation), from PageBuffer.in_store; None: in no store): every
        region of that file is stalled (see mpu_region_info.stalled), and
        so is a region made for it later, until the store is tried again
        (see Stalls); also when the region was released meanwhile.  The
        file's name, or None."""
        region = next((r for r in self._regions.values() if busy == (r.slot, r.gen)), None)
        if region is not None:
            store, name = region.key[:2], region.name
        elif busy in self._released:
            store, name = self._released[busy]
        else:
            return None
        self.stalls.caught(store, pid)
        for other in self._regions.values():
            if other.key[:2] == store:
                self.buffer.stall_region(other.slot, other.gen)
        return name

    def worker_ended(self, pid, by_itself, now):
        """A worker ended; if it was caught in a store, see Stalls.  The
        regions that read and write their store again."""
        return self._unstall(self.stalls.ended(pid, by_itself, now))

    def unstall_due(self, now):
        """The regions whose store is tried again now (Stalls)."""
        return self._unstall(self.stalls.due(now))

    def _unstall(self, stores):
        if not stores:
            return []
        regions = [r for r in self._regions.values() if r.key[:2] in stores]
        for region in regions:
            self.buffer.stall_region(region.slot, region.gen, False)
            log.warning("region %d (%s): its store is read and written again", region.rid,
                        region.name)
        return regions

    def recover(self, pid):
        """Free the pages a dead worker held FILLING or LEAVING."""
        return self.buffer.recover(pid, self.slots, self.page_size)

    def present(self, region):
        """Pages of the region PRESENT now."""
        return self.buffer.region_present(region.slot)
