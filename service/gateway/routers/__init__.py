"""Thin routers: validate, authorise, forward."""
