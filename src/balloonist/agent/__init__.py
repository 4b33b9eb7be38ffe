"""The user-level balloon agent (patent claim 9) and its wire protocol.

Everything in this package, and the modules it imports (``balloonist.driver``,
``balloonist.rate``, ``balloonist.errors``), runs inside guests: stdlib only, Python 3.9.
"""
