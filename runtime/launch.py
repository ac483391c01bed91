"""kata-runtime's entry point: the command runs warm (runtime/warm/) when this state root's warm
server is up, else cold (runtime/main.py); any command on a root without a server starts one
for the next commands."""
import os
import sys

from runtime.warm import client


def launch() -> None:
    code = client.forward(sys.argv)
    if code is not None:
        sys.exit(code)
    outcome = client.OUTCOME
    if outcome.server_wanted and os.path.isdir(outcome.root):
        # Now, not after the command: `factory init` runs for as long as its server, and whoever
        # checks the factory (`factory status`) before their first container then gets it warm.
        client.start_server(outcome.root)
        outcome.server_wanted = False
    from runtime import main as cli

    try:
        cli.run()
    finally:
        if outcome.server_wanted and os.path.isdir(outcome.root):
            client.start_server(outcome.root)


if __name__ == "__main__":
    launch()
