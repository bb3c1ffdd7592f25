"""The server process: one per machine.

arbiter.py     the main loop: signals, worker processes, heartbeats
listener.py    the socket and its lock
requests.py    connections and their requests
clients.py     the table of connections and clients (slots, sessions)
regions.py     the table of regions
monitor.py     the fault-monitor thread (C) and its tables
control.py     messages to workers that never block
offload.py     blocking steps of requests, off the main loop
stats.py       the status the server reports
"""
from mpumap.server.arbiter import Arbiter
from mpumap.server.listener import ServerRunning

__all__ = ["Arbiter", "ServerRunning"]
