"""``python -m minilora`` runs the command-line interface."""
from minilora.cli.main import main

if __name__ == "__main__":
    main()
