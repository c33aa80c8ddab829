"""``mpibn bench``: the benchmark (``run``) and its grid (``grid``)."""
