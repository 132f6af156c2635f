"""shopvec pipelines: config, catalog validation, Beam pipelines, the `shopvec` CLI."""
