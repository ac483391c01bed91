"""kata-runtime's entry point: the command runs warm (runtime/warm/) when this state root's warm
server is up, else cold (runtime/main.py), which then starts the server for the next command."""
import sys

from runtime.warm import client


def launch() -> None:
    code = client.forward(sys.argv)
    if code is not None:
        sys.exit(code)
    from runtime import main as cli

    try:
        cli.run()
    finally:
        if client.OUTCOME.server_wanted:
            client.start_server(client.OUTCOME.root)


if __name__ == "__main__":
    launch()
