"""``python -m trainguard`` runs the CLI."""

from trainguard.cli import main

main()
