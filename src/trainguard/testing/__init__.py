"""Test doubles trainguard ships for its users' tests and rehearsals.

* :mod:`trainguard.testing.modal_local`: a local Modal control plane speaking Modal's
  protocol (``python -m trainguard.testing.modal_local``).
"""
