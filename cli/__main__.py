"""`python -m dataops.cli`, as the tests run the command."""

from dataops.cli.main import main

main()
