"""The HTTP gateway (FastAPI): auth, limits, validation, errors, metrics; no tensors."""
