"""``mf-dist`` subcommands for the people who use the published tables (registered in mf_dist.cli)."""
