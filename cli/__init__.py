"""The ``minilora`` command line (installed as ``minilora.cli``). Commands parse, do I/O and print;
the work is done by ``minilora.*`` functions."""
