"""``python -m splitunet`` runs the ``splitunet`` console script."""

from splitunet.cli import main

main()
