"""``python -m trustmesh`` runs the CLI."""

import sys

from trustmesh.cli import main

main()
