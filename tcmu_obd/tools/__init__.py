"""One module per `tcmu-obd` subcommand family; each has register(subparsers).

COMMANDS maps every subcommand to the module that registers it, so the CLI imports only the
module of the command being run: importing every tool (the image stack, aiohttp, rich, ...)
cost ~0.35 s per invocation, which `fetch` spent before its first request left.
tests/test_cli.py checks the table against what the modules actually register.
"""

COMMANDS: dict[str, str] = {
    "build": "layer_tools",
    "commit": "layer_tools",
    "config": "config_check",
    "create": "layer_tools",
    "demo": "demo",
    "device": "device",
    "export": "export",
    "fetch": "fetch",
    "inspect": "inspect",
    "run": "run",
    "serve": "serve",
    "status": "status",
    "zfile": "zfile",
}
