//! Test support for zdivert: simulated nodes in network namespaces (`topology`), workloads
//! (`apps`), a stand-in ztunnel that is a real transparent proxy (`standin`), and the agent
//! binary run on a simulated node (`agent`).
pub mod agent;
pub mod apps;
pub mod fakeapi;
pub mod fallback;
pub mod load;
pub mod ns;
pub mod packets;
pub mod raw;
pub mod snapshot;
pub mod standin;
pub mod testrun;
pub mod topology;
pub mod ztunnel;

use topology::Node;

/// The stand-in ztunnel's configuration for `node` of the article's topology.
pub fn standin_config(
    node: &Node,
    services: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
) -> standin::Config {
    let o = node.gateway.octets();
    let net = std::net::Ipv4Addr::new(o[0], o[1], o[2], 0);
    standin::Config {
        ztunnel_ip: node.ztunnel.ip,
        ztunnel_ip6: node.ztunnel.ip6,
        local_cidr: (net, 24),
        local_cidr6: (topology::v6_of(net), 64),
        services,
        explicit: vec![],
    }
}

/// The stand-in ztunnel for `node` of the article's topology, running.
pub fn standin_for(
    node: &Node,
    services: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
) -> anyhow::Result<standin::Standin> {
    standin::Standin::start(&node.ztunnel.ns, standin_config(node, services))
}

/// Polls `check` until it holds; fails naming `what` after `within`, with the last error seen.
pub fn eventually(
    what: &str,
    within: std::time::Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    let mut last = String::from("never held");
    while std::time::Instant::now() < deadline {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("{what}: not within {within:?} ({last})")
}
