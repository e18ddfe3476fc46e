"""``python -m commute_cli`` (also what ``torchrun -m commute_cli`` runs)."""

from commute_cli.cli import main

if __name__ == "__main__":
    main()
