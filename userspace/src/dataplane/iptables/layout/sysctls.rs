//! The sysctls the layout needs (`rp_filter` off, `accept_local` on), per interface.
use super::*;

/// `net.ipv4.conf.<iface>.<key> = <value>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysctl {
    pub iface: String,
    pub key: &'static str,
    pub value: &'static str,
}

impl Sysctl {
    fn new(iface: &str, key: &'static str, value: &'static str) -> Self {
        Sysctl {
            iface: iface.into(),
            key,
            value,
        }
    }

    pub fn path(&self) -> String {
        format!("/proc/sys/net/ipv4/conf/{}/{}", self.iface, self.key)
    }
}

/// The node's sysctls. Interfaces we create ourselves are included; their original values need
/// no restoring since they go away with the link.
pub fn node_sysctls<'a>(p: &'a Params, pod_veths: impl Iterator<Item = &'a str>) -> Vec<Sysctl> {
    let zveth = p.ztunnel.as_ref().map(|z| z.veth.as_str());
    let tunnels = zveth.map(|_| [NODE_INBOUND, NODE_OUTBOUND]);
    let mut v: Vec<Sysctl> = ["all", "default"]
        .into_iter()
        .chain(zveth)
        .chain(tunnels.into_iter().flatten())
        .chain(pod_veths)
        .map(|i| Sysctl::new(i, "rp_filter", "0"))
        .collect();
    for i in zveth.into_iter().chain(tunnels.into_iter().flatten()) {
        v.push(Sysctl::new(i, "accept_local", "1"));
    }
    v
}

pub fn ztunnel_sysctls(z: &Ztunnel) -> Vec<Sysctl> {
    ["all", "default", &z.eth0, ZTUNNEL_INBOUND, ZTUNNEL_OUTBOUND]
        .into_iter()
        .map(|i| Sysctl::new(i, "rp_filter", "0"))
        .collect()
}
