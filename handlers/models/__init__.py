"""Model definitions and loading (torch)."""
