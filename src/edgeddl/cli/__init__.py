"""The `edgeddl` command: builds configs from its arguments and calls the API."""
