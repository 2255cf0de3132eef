"""``python -m vcell`` runs the command line."""

from vcell.cli import main

main()
