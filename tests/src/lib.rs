//! Test support for zdivert: simulated nodes in network namespaces (`topology`), workloads
//! (`apps`), a stand-in ztunnel that is a real transparent proxy (`standin`), and the agent
//! binary run on a simulated node (`agent`).
pub mod agent;
pub mod apps;
pub mod fakeapi;
pub mod fallback;
pub mod ns;
pub mod packets;
pub mod raw;
pub mod snapshot;
pub mod standin;
pub mod testrun;
pub mod topology;

use topology::Node;

/// The stand-in ztunnel configured for `node` of the article's topology.
pub fn standin_for(
    node: &Node,
    services: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
) -> anyhow::Result<standin::Standin> {
    let o = node.gateway.octets();
    standin::Standin::start(
        &node.ztunnel.ns,
        standin::Config {
            ztunnel_ip: node.ztunnel.ip,
            ztunnel_ip6: node.ztunnel.ip6,
            local_cidr: (std::net::Ipv4Addr::new(o[0], o[1], o[2], 0), 24),
            local_cidr6: (
                topology::v6_of(std::net::Ipv4Addr::new(o[0], o[1], o[2], 0)),
                64,
            ),
            services,
        },
    )
}
