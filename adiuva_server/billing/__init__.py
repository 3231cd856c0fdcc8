"""Stripe subscription billing (licensed mode only): see service.py."""
