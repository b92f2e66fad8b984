"""Speed and memory measurements: `python -m bench.<name>`; results in bench/results/."""
