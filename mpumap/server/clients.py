"""The server's table of connections and clients: who is connected, which
counter slots they hold, and what sessions of clients used."""
import collections
import os
import socket
import struct
import time

from mpumap._core import lib

SESSIONS_KEPT = 1000
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid (native order)


class ClientMapping:
    """A client's mapping of a region, as the server keeps it: a reference
    to the region, once registered where the client mapped it, what the
    client advised of its access (protocol.Advice), and whether it may
    write (then it is in the buffer's table of writers while registered);
    and how many of the region's write-backs whose pages were dropped it
    has been told of (`seen_errors`: each flush or unmap of it says so of
    those since, once)."""

    __slots__ = ("mid", "region", "address", "advice", "writable", "seen_errors")

    def __init__(self, mid, region, writable=False, seen_errors=0):
        self.mid = mid
        self.region = region
        self.address = None
        self.advice = 0  # Advice.NORMAL
        self.writable = writable
        self.seen_errors = seen_errors


class Connection:
    """One connection to the server; a client once it said HELLO.

    Owns its socket; once it said HELLO, a userfaultfd (the server's own copy
    of the client's) and a counter slot; and its mappings, each holding a
    reference to a region.

    Invariants: `uffd` and `slot` are set together, at HELLO, or not at all;
    `busy` while a request of it is worked on after its handler returned (a
    store opened off the main loop, workers being told): its socket is out
    of the selector meanwhile, so that it cannot ask for more.
    """

    def __init__(self, cid, sock):
        self.cid = cid
        self.sock = sock
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
        self.pid, self.uid, self.gid = _CREDENTIALS.unpack(creds)
        self.accepted = time.monotonic()
        self.uffd = None
        self.slot = None
        self.session = ""
        self.mappings = {}  # mapping id -> ClientMapping
        self.refusal = None  # why it may not use the server
        self.busy = False

    def __str__(self):
        return f"client {self.cid} (pid {self.pid}, uid {self.uid})"

    @property
    def gen(self):
        """The cid as the C side's u32 generation of the client's slot."""
        return self.cid & 0xFFFFFFFF

    @property
    def is_client(self):
        return self.uffd is not None

    def ranges(self):
        """The registered mappings, as the fault monitor wants them."""
        return sorted((m.address, m.address + m.region.map_length, m.region.slot, m.region.gen,
                       m.advice, m.region.window, m.region.unit, int(m.writable))
                      for m in self.mappings.values() if m.address is not None)


class ClientTable:
    """Every connection, the clients' counter slots, and sessions' totals.

    Owns the connections (their sockets and userfaultfds: `remove` closes
    them) and the per-client counter slots of the buffer segment.  Slots are
    reused oldest-freed first, so that fillers are long done with a slot
    before it serves another client; a freed slot's counts go to its
    session's totals when it is taken again.  Keeps the totals of each
    user's last SESSIONS_KEPT session tags (what `mpumap-client run --stats`
    asks for): one user's many tags never push out another's.

    Invariants: `per_user` counts open connections by uid, `clients_per_user`
    those that hold a slot, `mappings_per_user` their mappings.
    """

    def __init__(self, buffer):
        self.buffer = buffer
        self._connections = {}  # cid -> Connection
        self._free_slots = collections.deque(range(lib.MPU_CLIENT_SLOTS))
        self._retired = {}  # slot -> (session, uid) of the client that held it
        self._sessions = {}  # uid -> OrderedDict(session -> totals), oldest first
        self.per_user = collections.Counter()
        self.clients_per_user = collections.Counter()
        self.mappings_per_user = collections.Counter()

    def __len__(self):
        return len(self._connections)

    def __iter__(self):
        return iter(list(self._connections.values()))

    def clients(self):
        return [c for c in self._connections.values() if c.is_client]

    def add(self, conn):
        self._connections[conn.cid] = conn
        self.per_user[conn.uid] += 1

    @property
    def slots_left(self):
        return len(self._free_slots)

    def make_client(self, conn, uffd, session):
        """Give a connection that said HELLO its userfaultfd and a slot."""
        slot = self._free_slots.popleft()
        retired = self._retired.pop(slot, None)
        if retired is not None:
            totals = self._totals(retired)
            for name, value in self.buffer.client_counters(slot).items():
                totals[name] += value
        self.buffer.reset_client(slot)
        conn.uffd, conn.slot, conn.session = uffd, slot, session
        self.clients_per_user[conn.uid] += 1

    def welcomed(self, conn):
        """A client is in: its session counts it (not before: a HELLO that
        fails half-way is nobody's client)."""
        self._totals((conn.session, conn.uid))["clients"] += 1

    def add_mapping(self, conn, mapping):
        conn.mappings[mapping.mid] = mapping
        self.mappings_per_user[conn.uid] += 1

    def remove_mapping(self, conn, mid):
        mapping = conn.mappings.pop(mid, None)
        if mapping is not None:
            _decrement(self.mappings_per_user, conn.uid)
        return mapping

    def remove(self, conn):
        """Forget a connection and close what it held; its mappings must be
        gone already, and the fault monitor no longer watch its uffd."""
        if self._connections.pop(conn.cid, None) is None:
            return
        _decrement(self.per_user, conn.uid)
        conn.sock.close()
        self.unmake_client(conn)

    def unmake_client(self, conn):
        """Close a client's userfaultfd and free its slot: reused last of all
        the free slots, so the fillers are long done with it by then."""
        if conn.uffd is None:
            return
        os.close(conn.uffd)
        conn.uffd = None
        _decrement(self.clients_per_user, conn.uid)
        self._retired[conn.slot] = (conn.session, conn.uid)
        self._free_slots.append(conn.slot)
        conn.slot = None

    def _totals(self, key):
        """The totals of (session, uid).  Each user's own last SESSIONS_KEPT
        sessions are kept: one user's many tags never push out another's."""
        session, uid = key
        mine = self._sessions.setdefault(uid, collections.OrderedDict())
        totals = mine.get(session)
        if totals is None:
            totals = mine[session] = _zero_totals()
            while len(mine) > SESSIONS_KEPT:
                mine.popitem(last=False)
        return totals

    def session_report(self, session, uid=None):
        """What the clients of a session used, those gone and those here:
        all of them, or (with a uid) that user's only."""
        def ours(key):
            return key[0] == session and (uid is None or key[1] == uid)

        report = _zero_totals()
        for owner, sessions in self._sessions.items():
            totals = sessions.get(session)
            if totals is not None and ours((session, owner)):
                for name, value in totals.items():
                    report[name] += value
        here = [c for c in self._connections.values()
                if c.is_client and ours((c.session, c.uid))]
        slots = [slot for slot, key in self._retired.items() if ours(key)]
        for slot in slots + [c.slot for c in here]:
            for name, value in self.buffer.client_counters(slot).items():
                report[name] += value
        report["connected"] = len(here)
        return report


def _zero_totals():
    from mpumap.pbm import CLIENT_COUNTERS

    return dict.fromkeys(CLIENT_COUNTERS + ("clients",), 0)


def _decrement(counter, key):
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
