"""`python -m lorafleet` = the `lorafleet` command."""

from lorafleet.cli import main

main()
