"""`python -m loader`, so tests and cron can run the real CLI without the console script."""

from .cli import main

main()
