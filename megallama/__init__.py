"""megallama."""
