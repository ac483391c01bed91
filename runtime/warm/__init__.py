"""The warm runtime: kata-runtime's commands run in a fork of a process that has already imported
everything (the factory library, grpc, asyncio, the shim), instead of in a cold interpreter.

`kata-runtime` starts as a thin client (client.py) that hands its argv, environment, working
directory and stdio to the warm server (server.py) of its state root and program, and exits with
the command's exit status. The server forks one worker per command; the worker runs the command
exactly as the cold command line would (runtime.main). No server, or one of another build: the
command runs cold, and starts a server for the next one.

A container's host process must be the create command's child (a container engine's shim, as
subreaper, reaps it as it would runc's container process), but a warm shim is the worker's. So
the client forks an anchor (anchor.py) for it: a small process that lives exactly as long as the
shim, exits with its exit status, passes signals on, and whose death stops the container.
"""
