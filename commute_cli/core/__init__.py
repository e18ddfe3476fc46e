"""core layer of commute (see docs/ARCHITECTURE.md)."""
