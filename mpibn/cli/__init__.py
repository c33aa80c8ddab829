"""The command line, ``mpibn COMMAND`` (or ``python -m mpibn COMMAND``): tools around the reference.

``main`` parses and dispatches; ``launch`` starts a command under mpiexec;
``demo`` and ``explain`` teach; ``textbook`` is their independent yardstick;
``bench`` times the layer. Nothing in the reference imports this package.
"""
