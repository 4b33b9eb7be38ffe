"""A simulated host on which every layer of the balloon system is ours.

Start at :func:`balloonist.sim.runner.run_scenario`; scenarios are described in
``docs/scenarios.md``.
"""
