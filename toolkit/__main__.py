import sys


def _run() -> int:
    try:
        from toolkit.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the command line's own modules load (see cli.main)
        print("interrupted", file=sys.stderr)
        return 130
    return main()


sys.exit(_run())
