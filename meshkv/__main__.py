"""`python -m meshkv` runs the command line."""

from meshkv.cli import main

main()
