"""What the pipeline promises when things go wrong: bad input, lost workers, killed processes."""
