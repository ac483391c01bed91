"""GuestMessage builders and the error type request handlers raise, shared by the agent's modules."""

from __future__ import annotations

from protocols.agent import agent_pb2


class RequestError(Exception):
    """The request is invalid or could not be carried out; the message goes back to the host."""


def response_message(request_id: int, error: str = "") -> agent_pb2.GuestMessage:
    message = agent_pb2.GuestMessage()
    message.response.id = request_id
    message.response.error = error
    return message


def reply_message(request_id: int, kind: str) -> agent_pb2.GuestMessage:
    """A success Response with its `kind` set (empty replies too: the host checks it)."""
    message = response_message(request_id)
    getattr(message.response, kind).SetInParent()
    return message
