"""``python -m vcell`` runs the command line."""

try:
    from vcell.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line loads: nothing ran, nothing to say
    raise SystemExit(130) from None

main()
