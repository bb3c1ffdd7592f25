"""mpumap-client run: start a command connected to a server, pass signals
through, report what it used."""
import os
import signal
import subprocess
import sys
import uuid

import mpumap
from mpumap.protocol import socket_path as resolve_socket_path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)


class LaunchError(Exception):
    """The command could not be started; the text says why."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def launch(command, socket_path=None, env_extra=None):
    """Run command with MPUMAP_SOCKET and a session tag set; return
    (exit status, session).  The status is the shell's: 128+N for a
    command killed by signal N."""
    # Absolute: the command may change directory before it connects.
    path = os.path.abspath(resolve_socket_path(socket_path))
    try:
        mpumap.server_stats(path)
    except (OSError, ValueError) as exc:
        raise LaunchError(str(getattr(exc, "strerror", None) or exc), 1) from None
    session = f"run-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "MPUMAP_SOCKET": path, "MPUMAP_SESSION": session,
           **(env_extra or {})}
    # Signals wait for us in sigtimedwait, which also tells where each came
    # from: a Ctrl-C from the terminal reached the command already.
    watched = set(FORWARDED) | {signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        try:
            proc = subprocess.Popen(
                command, env=env,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask))
        except FileNotFoundError:
            raise LaunchError(f"{command[0]}: command not found", 127) from None
        except PermissionError:
            raise LaunchError(f"{command[0]}: permission denied", 126) from None
        except OSError as exc:  # not a program (ENOEXEC), and the like: as a shell says
            raise LaunchError(f"{command[0]}: {exc.strerror}", 126) from None
        while proc.poll() is None:
            info = signal.sigtimedwait(watched, 0.5)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_signo == signal.SIGINT and info.si_code == 0x80:  # SI_KERNEL: a tty
                continue
            proc.send_signal(info.si_signo)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    status = proc.returncode
    return (128 - status if status < 0 else status), session


def session_report(socket_path, session):
    """One line on what a session's clients used, or None if the server is gone."""
    try:
        report = mpumap.server_stats(socket_path, session=session)["session"]
    except (OSError, ValueError):
        return None
    served = report["copies"] + report["wakes"]
    return (f"mpumap: {report['clients']} client(s) of the command: {report['faults']} faults, "
            f"{served} served ({report['copies']} by copy, {report['wakes']} by wake), "
            f"{report['bytes'] / (1 << 20):.1f} MiB filled, threads waited "
            f"{report['wait_ns'] / 1e9:.3f} s on faults")


def main_run(command, socket_path, stats, env_extra=None):
    try:
        status, session = launch(command, socket_path, env_extra)
    except LaunchError as exc:
        print(f"mpumap-client: {exc}", file=sys.stderr)
        return exc.status
    if stats:
        line = session_report(resolve_socket_path(socket_path), session)
        print(line or "mpumap: the server is gone; no statistics", file=sys.stderr)
    return status
