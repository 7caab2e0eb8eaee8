//! ZDS's metrics, registered into the agent's registry: the ztunnels connected, and every
//! request by kind and by how ztunnel answered it.
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub peers: Gauge,
    requests: Family<Labels, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "zds_peers",
            "ztunnels connected to the ZDS socket that have taken the snapshot",
            self.peers.clone(),
        );
        registry.register(
            "zds_requests",
            "ZDS requests sent to ztunnel, by request and outcome (acked, refused, failed)",
            self.requests.clone(),
        );
    }

    pub fn count(&self, request: &'static str, outcome: &'static str, n: u64) {
        self.requests
            .get_or_create(&vec![("request", request), ("outcome", outcome)])
            .inc_by(n);
    }
}
