"""Command-line entry points: mpumap-server, mpumap-client, mpumap."""
import os
import sys

import click

from mpumap import __version__, settings as S


def _run(command, args=None):
    """Run a click command; usage errors become one line and status 2."""
    try:
        return command.main(args=args, standalone_mode=False) or 0
    except click.UsageError as exc:
        hint = ""
        if exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} --help)"
        click.echo(f"{command.name}: error: {exc.format_message()}{hint}", err=True)
        return 2
    except click.Abort:
        return 130
    except click.ClickException as exc:
        click.echo(f"{command.name}: error: {exc.format_message()}", err=True)
        return exc.exit_code


class _Setting(click.ParamType):
    """A click type that parses with one of the settings module's rules."""

    def __init__(self, name, parse):
        self.name = name
        self._parse = parse

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except S.SettingError as exc:
            self.fail(str(exc), param, ctx)


SIZE = _Setting("size", S.parse_size)
PAGE_SIZE = _Setting("size", S.parse_page_size)
WORKERS = _Setting("count", lambda v: S.parse_count(v, "the number of workers"))
PERCENT = _Setting("percent", lambda v: S.parse_count(v, "a watermark", 0, 100))


SERVER_HELP = """Run the mpumap server: one per machine.

Clients (mpumap.connect() in Python) map files through it.  Every umap page
they touch is read once into a shared buffer and served from there to every
process that maps the same file; the buffer stays within its size, evicting
the oldest pages first.

Each option may also be given by the environment variable shown, the name
MP-UMap uses; a flag wins over its variable.

\b
Examples:
  mpumap-server --buffer-size 4G --page-size 64K
  UMAP_PAGE_FILLERS=4 mpumap-server --socket /run/user/1000/mpumap.sock
"""


@click.command("mpumap-server", help=SERVER_HELP,
               context_settings={"help_option_names": ["-h", "--help"],
                                 "max_content_width": 100})
@click.option("--socket", "socket_path", envvar="MPUMAP_SOCKET", default=S.DEFAULT_SOCKET,
              show_default=True, show_envvar=True, help="Unix socket to listen on.")
@click.option("--page-size", envvar="UMAP_PAGESIZE", type=PAGE_SIZE,
              default=str(S.DEFAULT_PAGE_SIZE), show_default=True, show_envvar=True,
              help="Size of a umap page, the unit of filling and eviction: a multiple "
                   "of the system page size (64K, 2M, ...).")
@click.option("--buffer-size", envvar="UMAP_BUFSIZE", metavar="PAGES|SIZE",
              show_envvar=True,
              help="Buffer size: a number of umap pages (as UMAP_BUFSIZE), or a size "
                   "such as 256M or 4G.  Default: follow the memory the machine can "
                   "spare, re-evaluated every --adapt-interval seconds.")
@click.option("--fillers", envvar="UMAP_PAGE_FILLERS", type=WORKERS,
              default=str(S.DEFAULT_FILLERS), show_default=True, show_envvar=True,
              help="Filler processes: they read pages from files and hand them to clients.")
@click.option("--evictors", envvar="UMAP_PAGE_EVICTORS", type=WORKERS,
              default=str(S.DEFAULT_EVICTORS), show_default=True, show_envvar=True,
              help="Evictor processes: they keep the buffer between the watermarks.")
@click.option("--high-water", envvar="UMAP_EVICT_HIGH_WATER_THRESHOLD", type=PERCENT,
              default=str(S.DEFAULT_HIGH_WATER), show_default=True, show_envvar=True,
              help="Start evicting when the buffer is this full (percent).")
@click.option("--low-water", envvar="UMAP_EVICT_LOW_WATER_THRESHOLD", type=PERCENT,
              default=str(S.DEFAULT_LOW_WATER), show_default=True, show_envvar=True,
              help="Evict down to this fill level (percent).")
@click.option("--adapt-interval", envvar="UMAP_BUFADAPT_FREQ",
              type=click.FloatRange(min=0.1), default=S.DEFAULT_ADAPT_INTERVAL,
              show_default=True, show_envvar=True,
              help="Seconds between re-evaluations of an adaptive buffer's size.")
@click.option("--memory-reserve", envvar="UMAP_MEMORY_RESERVE", type=SIZE, metavar="SIZE",
              show_envvar=True,
              help="Memory an adaptive buffer leaves to the rest of the machine.  "
                   "Default: 10% of the RAM (or of the memory cgroup's limit, when "
                   "smaller), at least 64M, at most 4G.")
@click.option("--read-ahead", envvar="UMAP_READ_AHEAD", type=click.IntRange(0, S.MAX_READ_AHEAD),
              show_envvar=True, metavar="PAGES",
              help="Largest read-ahead window, in pages after the faulting one; 0: "
                   "none.  Faults that follow one another through a file are a scan: "
                   "windows of pages after them are read, in the background and "
                   "growing from 4 pages, so that the client finds them there and "
                   "the disk gets large reads.  Other faults read their page alone.  "
                   "Default: 1 MiB of pages, at most a quarter of a fixed buffer.")
@click.option("--spin", "spin_us", envvar="UMAP_SPIN_US", type=click.IntRange(0, S.MAX_SPIN_US),
              default=S.DEFAULT_SPIN_US, show_default=True, show_envvar=True, metavar="USEC",
              help="Microseconds the fault monitor and the fillers keep polling for "
                   "their next work before they sleep, yielding the CPU meanwhile; 0: "
                   "never.  Where waking a sleeping CPU is slow (virtual machines) this "
                   "more than halves the time of a fault served from memory.  When work "
                   "comes slower than that (faults that wait for the disk), they back "
                   "off and sleep at once.")
@click.option("--store-io", envvar="UMAP_STORE_IO", default=S.DEFAULT_STORE_IO,
              show_default=True, show_envvar=True,
              type=click.Choice(["direct", "drop", "cached"], case_sensitive=False),
              help="How fillers read files: direct (O_DIRECT, no second copy in the page "
                   "cache; 'drop' where the file system refuses it), drop (buffered, then "
                   "dropped from the page cache), cached (buffered, left in the page cache).")
@click.option("--max-regions", envvar="UMAP_MAX_REGIONS", type=click.IntRange(1, 1 << 20),
              default=S.DEFAULT_MAX_REGIONS, show_default=True, show_envvar=True,
              help="Files the server serves at once; a map past it is refused.")
@click.option("--max-client-mappings", envvar="UMAP_MAX_CLIENT_MAPPINGS",
              type=click.IntRange(1, 1 << 20), default=S.DEFAULT_MAX_CLIENT_MAPPINGS,
              show_default=True, show_envvar=True,
              help="Mappings one client may hold at once.")
@click.option("--cpus", envvar="UMAP_CPUS", type=_Setting("cpus", S.parse_cpus),
              show_envvar=True,
              help="Run the server's monitor and workers on these CPUs only (0, 0-1, "
                   "0,2-3): to keep it off the cores an application's ranks are "
                   "pinned to, or to keep it near them.")
@click.option("--socket-mode", envvar="UMAP_SOCKET_MODE", type=_Setting("mode", S.parse_mode),
              default="0600", show_default=True, show_envvar=True,
              help="Permissions of the socket: who may connect.  0600: the server's user "
                   "(and root); 0660 with --socket-group: a group; 0666: everybody.")
@click.option("--socket-group", envvar="UMAP_SOCKET_GROUP", type=_Setting("group", S.parse_group),
              show_envvar=True, help="Group of the socket (a name or a gid).")
@click.option("--allow-uid", "allow_uids", multiple=True, type=_Setting("user", S.parse_user),
              help="Accept connections only from these users (and root and the server's "
                   "own user); repeatable.  A name or a uid.")
@click.option("--allow-gid", "allow_gids", multiple=True, type=_Setting("group", S.parse_group),
              help="Accept connections from these groups too (primary or supplementary); "
                   "repeatable.")
@click.option("--worker-timeout", envvar="UMAP_WORKER_TIMEOUT", type=click.FloatRange(min=0.1),
              default=30.0, show_default=True, show_envvar=True,
              help="Seconds a worker may give no sign of life before it is replaced.")
@click.option("--pidfile", type=click.Path(dir_okay=False, writable=True),
              help="Write the server's pid to this file while it runs.")
@click.option("--log-level", envvar="UMAP_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="How much to log on stderr.")
@click.version_option(__version__, "-V", "--version", prog_name="mpumap")
def server_command(socket_path, page_size, buffer_size, fillers, evictors, high_water,
                   low_water, adapt_interval, memory_reserve, read_ahead, spin_us, store_io,
                   max_regions, max_client_mappings, cpus, socket_mode, socket_group,
                   allow_uids, allow_gids, worker_timeout, pidfile, log_level):
    try:
        buffer_pages = (None if buffer_size is None
                        else S.parse_buffer_pages(buffer_size, page_size))
        settings = S.Settings(
            socket=socket_path, page_size=page_size, buffer_pages=buffer_pages,
            fillers=fillers, evictors=evictors, high_water=high_water,
            low_water=low_water, adapt_interval=adapt_interval,
            memory_reserve=memory_reserve, read_ahead=read_ahead, spin_us=spin_us,
            store_io=store_io.lower(), max_regions=max_regions,
            max_client_mappings=max_client_mappings, socket_mode=socket_mode,
            socket_group=socket_group, allow_uids=tuple(allow_uids),
            allow_gids=tuple(allow_gids), cpus=cpus or (), pidfile=pidfile,
            worker_timeout=worker_timeout)
    except S.SettingError as exc:
        raise click.UsageError(str(exc)) from None
    from mpumap import logs
    from mpumap.server import Arbiter

    logs.configure(log_level)

    try:
        return Arbiter(settings).run()
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


SOCKET_OPTION = click.option(
    "--socket", "socket_path", envvar="MPUMAP_SOCKET", default=None,
    help=f"The server's socket (default: $MPUMAP_SOCKET, else {S.DEFAULT_SOCKET}).")


@click.group("mpumap", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mpumap")
def mpumap_command():
    """mpumap: a multi-process user-space paging service.

    \b
    Examples:
      mpumap top                     a live view of the server
      mpumap top --once --json       one snapshot, for scripts
      mpumap stats                   the server's raw counters as JSON
    """


@mpumap_command.command("top")
@SOCKET_OPTION
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between readings.")
@click.option("--once", is_flag=True, help="Print one snapshot (two readings one interval "
              "apart, for the rates) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print snapshots as JSON.")
def top_command(socket_path, interval, once, as_json):
    """A live view of the server: its processes (CPU, memory), clients,
    regions, buffer, rates and fault latency.  Press q to quit.

    \b
    Examples:
      mpumap top --interval 0.5
      mpumap top --once --json | jq .rates
    """
    from mpumap import top

    path = S.socket_path(socket_path)
    try:
        return top.run(path, interval, once, as_json)
    except BrokenPipeError:  # the reader of our output went away: fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        click.echo(f"mpumap top: {exc.strerror or exc}", err=True)
        return 1


@mpumap_command.command("stats")
@SOCKET_OPTION
def stats_command(socket_path):
    """Print the server's status and counters as JSON."""
    import json

    import mpumap

    try:
        click.echo(json.dumps(mpumap.server_stats(socket_path), indent=2))
    except mpumap.ServerUnavailable as exc:
        click.echo(f"mpumap: {exc.strerror}", err=True)
        return 1


@click.group("mpumap-client", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mpumap")
def client_command():
    """Run programs against an mpumap server, and ask it about itself.

    \b
    Examples:
      mpumap-client run --stats -- python train.py
      mpumap-client run --map '*.bin' -- ./unmodified-program data.bin
      mpumap-client info
      cc prog.c $(mpumap-client config --cflags --libs)
    """


@client_command.command("run", context_settings={"ignore_unknown_options": True,
                                                 "allow_interspersed_args": False})
@SOCKET_OPTION
@click.option("--stats", is_flag=True,
              help="When the command ends, print (on stderr) what its processes used: "
                   "faults, bytes filled, time their threads waited on faults.")
@click.option("--map", "patterns", multiple=True, metavar="PATTERN",
              help="Serve the command's own read-only mmap() of files matching this "
                   "pattern (fnmatch, on the whole path) through the server; repeatable.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(socket_path, stats, patterns, command):
    """Run COMMAND with MPUMAP_SOCKET set, so that every mpumap client in it
    finds the server; pass signals to it and exit with its status.

    \b
    Examples:
      mpumap-client run -- python -c 'import mpumap; mpumap.connect()'
      mpumap-client run --stats --socket /tmp/s.sock -- ./reader data.bin
      mpumap-client run --map '/data/*.npy' -- python -c 'import numpy; ...'
    """
    from mpumap import launcher

    env = None
    if patterns:
        from mpumap import native

        try:
            env = native.preload_env(list(patterns), S.socket_path(socket_path))
        except native.NativeMissing as exc:
            raise click.ClickException(str(exc)) from None
    return launcher.main_run(list(command), socket_path, stats, env)


@client_command.command("info")
@SOCKET_OPTION
def info_command(socket_path):
    """Print the server's settings."""
    import mpumap

    try:
        with mpumap.connect(socket_path) as client:
            for name, value in client.settings._asdict().items():
                click.echo(f"{name:18} {value}")
    except mpumap.ServerUnavailable as exc:
        click.echo(f"mpumap-client: {exc.strerror}", err=True)
        return 1


@client_command.command("config")
@click.option("--cflags", "want_cflags", is_flag=True, help="Compiler flags (-I...).")
@click.option("--libs", "want_libs", is_flag=True,
              help="Linker flags for libmpumapclient, with an rpath.")
@click.option("--preload", "want_preload", is_flag=True,
              help="The path of libmpumappreload.so, for LD_PRELOAD.")
def config_command(want_cflags, want_libs, want_preload):
    """Print flags to build C programs against libmpumapclient, like
    pkg-config:  cc prog.c $(mpumap-client config --cflags --libs)"""
    from mpumap import native

    try:
        if want_cflags or want_libs:
            click.echo(native.config_line(want_cflags, want_libs))
        if want_preload:
            click.echo(native.preload_library())
    except native.NativeMissing as exc:
        raise click.ClickException(str(exc)) from None
    if not (want_cflags or want_libs or want_preload):
        raise click.UsageError("say what to print: --cflags, --libs or --preload")


def server_main():
    sys.exit(_run(server_command))


def client_main():
    sys.exit(_run(client_command))


def mpumap_main():
    sys.exit(_run(mpumap_command))


if __name__ == "__main__":
    server_main()
