"""Models trained here on real data, and their data splits."""
