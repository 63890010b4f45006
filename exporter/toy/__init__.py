"""Training of the toy text-to-image model and its adapters (torch side)."""
