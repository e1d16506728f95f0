"""RQ jobs: module-level functions with JSON arguments, run by ``python -m service.jobs.worker``."""
