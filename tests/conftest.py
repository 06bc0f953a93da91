pytest_plugins = ["tests.hosts.fixtures"]
