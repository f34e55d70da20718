"""Transports: the only code that owns sockets. Nothing above can tell which one it runs on."""

from emulab.transport.unix_socket import Channel, ChannelClosed, UnixListener, channel_pair

__all__ = ["Channel", "ChannelClosed", "UnixListener", "channel_pair"]
