"""free_port picks below the ephemeral range, where outgoing connections cannot take its port before the caller's
server binds it, and never hands the same port out twice in one process."""

import socket

from vita.runtime.ports import LOWEST, _bindable, ephemeral_range, free_port


def test_ports_lie_below_the_ephemeral_range_are_distinct_and_bindable():
    first, last = ephemeral_range()
    assert LOWEST < first <= last
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(LOWEST <= port < first for port in ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_outgoing_connections_take_their_source_ports_from_the_ephemeral_range():
    """The premise: a connection's source port is where free_port never picks."""
    first, last = ephemeral_range()
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        clients = [socket.create_connection(server.getsockname()) for _ in range(20)]
        try:
            assert all(first <= c.getsockname()[1] <= last for c in clients)
        finally:
            for c in clients:
                c.close()


def test_a_port_something_is_bound_to_is_not_free():
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        assert not _bindable(held.getsockname()[1])
