"""The server's worker processes, forked by the arbiter: fillers read pages
from the store into clients (fillers.py), evictors keep the buffer within its
size (evictor.py).  base.py is what both are."""
from mpumap.workers.evictor import Evictor
from mpumap.workers.fillers import Filler

ROLES = {"filler": Filler, "evictor": Evictor}

__all__ = ["Evictor", "Filler", "ROLES"]
