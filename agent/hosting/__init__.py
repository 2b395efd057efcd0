"""Running objects: the hosted-object table, runtime and runner, sandbox and cgroups, migration."""
