"""``python -m vcell`` and the ``vcell`` command: run the command line."""


def run() -> None:
    """Load the command line and run it; a Ctrl-C while it loads (about 0.2 s) ends quietly, status 130."""
    try:
        from vcell.cli import main
    except KeyboardInterrupt:  # nothing ran, nothing to say (the console script showed a traceback)
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    run()
