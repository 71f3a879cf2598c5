"""The demo model's training (``python -m demo.train``): scaffolding kept in the repository, never installed."""
