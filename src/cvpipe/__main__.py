"""``python -m cvpipe``: the same command line as ``cvpipe``."""

from cvpipe.cli import main

if __name__ == "__main__":
    main()
