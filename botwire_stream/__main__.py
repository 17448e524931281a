"""``python -m botwire_stream``: the ``botwire`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
