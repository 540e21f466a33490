"""Running an experiment: the driver (run directory, metrics, display), the training loop and where its processes
live, placement on a Ray cluster, metrics and W&B, the progress display, and the task reports."""
