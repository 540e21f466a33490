"""``softflow sweep``: one experiment run many times on Ray Tune. spec.py reads and checks sweep files (their format
is documented there), tune.py runs the trials, results.py condenses and reports them."""
