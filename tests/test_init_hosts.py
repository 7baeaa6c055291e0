"""
`fitbroker init --hosts`: replicas placed on several machines.
"""

import pytest
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactorClock

from fit_broker.cli import _parser
from fit_broker.config import load_config
from fit_broker.errors import ConfigError
from fit_broker.init import init_cluster, replica_lines
from fit_broker.tls import client_tls_options


def test_hosts_written_and_read_back(tmp_path):
    """Each replica listens on its host's address (all interfaces for a name) and is reached at it."""
    path = init_cluster(
        str(tmp_path / "c"), clients=["ops"], first_port=7600, name="prod",
        hosts=["10.0.0.1", "broker-b.example", "10.0.0.3", "10.0.0.1"], metrics_port=9400,
    )
    config = load_config(path)
    assert [(r.listen, r.connect, r.metrics) for r in config.replicas] == [
        ("tcp:7600:interface=10.0.0.1", "tcp:10.0.0.1:7600", "tcp:9400:interface=127.0.0.1"),
        ("tcp:7600", "tcp:broker-b.example:7600", "tcp:9400:interface=127.0.0.1"),
        ("tcp:7600:interface=10.0.0.3", "tcp:10.0.0.3:7600", "tcp:9400:interface=127.0.0.1"),
        # A second replica on the same host takes the next ports.
        ("tcp:7601:interface=10.0.0.1", "tcp:10.0.0.1:7601", "tcp:9401:interface=127.0.0.1"),
    ]
    reactor = MemoryReactorClock()
    for spec in config.replicas:
        serverFromString(reactor, spec.listen)
        clientFromString(reactor, spec.connect)
        serverFromString(reactor, spec.metrics)
    # Identities stay in the certificates' names: no host appears in them.
    assert "10.0.0.1" not in (tmp_path / "c" / "cluster.toml").read_text().split("[[replicas]]")[0]


def test_without_hosts_replicas_stay_on_loopback(tmp_path):
    """Without --hosts every replica listens on 127.0.0.1 at first_port + i, without metrics."""
    config = load_config(init_cluster(str(tmp_path / "c"), first_port=7700))
    assert [(r.listen, r.connect, r.metrics) for r in config.replicas] == [
        (f"tcp:{7700 + i}:interface=127.0.0.1", f"tcp:127.0.0.1:{7700 + i}", None) for i in range(4)
    ]


def test_ipv6_host_round_trips_through_toml_and_endpoints():
    """An IPv6 address is escaped for the endpoint string and for TOML."""
    import tomllib

    table = tomllib.loads("\n".join(replica_lines(7500, "fd00::7")))
    reactor = MemoryReactorClock()
    assert serverFromString(reactor, table["listen"])._interface == "fd00::7"
    assert clientFromString(reactor, table["connect"])._host == "fd00::7"


@pytest.mark.parametrize(
    "hosts, message",
    [
        (["a", "b", "c"], r"expected 4 hosts \(one per replica\), found 3"),
        (["a", "b", "c", "bad host"], "a DNS name or an IP address, found 'bad host'"),
        (["a", "b", "c", 'x"y'], "found 'x\"y'"),
    ],
)
def test_bad_hosts_are_one_line_errors(tmp_path, hosts, message):
    """A wrong number of hosts, or one that is not a name or address, is refused before writing."""
    with pytest.raises(ConfigError, match=message):
        init_cluster(str(tmp_path / "c"), hosts=hosts)
    assert not (tmp_path / "c").exists()


def test_init_parser_takes_hosts_and_metrics_port():
    """`fitbroker init --hosts h1,h2 --metrics-port N` reaches init_cluster's arguments."""
    args = _parser().parse_args(["init", "d", "--hosts", "h1,h2,h3,h4", "--metrics-port", "9400"])
    assert args.hosts == "h1,h2,h3,h4" and args.metrics_port == 9400


def test_clients_verify_the_certificate_name_not_the_host(tmp_path, monkeypatch):
    """TLS clients check each replica's certificate name, whatever host they connect to."""
    from fit_broker import credentials

    checked = []

    def record(ca_pem, cert_pem, key_pem, server_hostname):
        checked.append(server_hostname)
        return client_tls_options(ca_pem, cert_pem, key_pem, server_hostname)

    monkeypatch.setattr(credentials, "client_tls_options", record)
    path = init_cluster(str(tmp_path / "c"), clients=["ops"], hosts=["10.9.9.1", "b.example", "c", "d"])
    config = load_config(path)
    credentials.client_credentials(config, "ops", MemoryReactorClock())
    assert checked == [f"replica-{i}.fitbroker" for i in range(4)]
