"""What you run: the `polyhead` CLI and its configs."""
