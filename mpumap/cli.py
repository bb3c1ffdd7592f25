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


def settings_options(command):
    """Apply a click option for every setting of S.SPECS.  Options default
    to None (not given): Settings knows the defaults, shown here as text
    (unless the help says it already)."""
    for spec in reversed(S.SPECS):
        help = spec.help or spec.summary
        shown = False if "Default:" in help else spec.default_text.strip("`") or False
        command = click.option(
            spec.flag, spec.name, envvar=spec.variable, show_envvar=bool(spec.variable),
            type=_Setting(spec.metavar or "value", spec.parse), metavar=spec.metavar,
            multiple=spec.multiple, help=help, show_default=shown,
        )(command)
    return command


@click.command("mpumap-server", help=SERVER_HELP,
               context_settings={"help_option_names": ["-h", "--help"],
                                 "max_content_width": 100})
@settings_options
@click.version_option(__version__, "-V", "--version", prog_name="mpumap")
def server_command(**options):
    try:
        settings = S.Settings.from_options(options)
    except S.SettingError as exc:
        raise click.UsageError(str(exc)) from None
    from mpumap import logs
    from mpumap.server import Arbiter

    logs.configure(settings.log_level)
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
    except (OSError, ValueError) as exc:
        click.echo(f"mpumap top: {getattr(exc, 'strerror', None) or exc}", err=True)
        return 1


@mpumap_command.command("stats")
@SOCKET_OPTION
def stats_command(socket_path):
    """Print the server's status and counters as JSON."""
    import json

    import mpumap

    try:
        click.echo(json.dumps(mpumap.server_stats(socket_path), indent=2))
    except (OSError, ValueError) as exc:
        click.echo(f"mpumap: {getattr(exc, 'strerror', None) or exc}", err=True)
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
              help="Serve the command's own mmap() of files matching this pattern "
                   "(fnmatch, on the whole path; shared mappings, read-only or "
                   "read-write) through the server; repeatable.")
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
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--map") from None
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
    except (OSError, ValueError) as exc:
        click.echo(f"mpumap-client: {getattr(exc, 'strerror', None) or exc}", err=True)
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
