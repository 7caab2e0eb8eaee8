//! The article's nodes rebuilt in network namespaces (README, "Set-up"): every node is
//! a netns of its own holding its pods' host veths and routes (ptp, host side 10.244.N.1), every
//! pod and ztunnel a netns behind a veth, the nodes joined by an underlay veth. Nothing touches
//! the machine's root namespace; dropping the topology deletes every namespace (and so every
//! veth) it made.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};

use crate::ns::{Netns, ip_batch, unique_prefix};

pub struct PodDef {
    pub name: &'static str,
    pub namespace: &'static str,
    pub ip: Ipv4Addr,
    pub ambient: bool,
}

pub struct NodeDef {
    pub name: &'static str,
    /// Third octet of the node's pod CIDR 10.244.N.0/24.
    pub cidr_octet: u8,
    pub underlay_ip: Ipv4Addr,
    pub ztunnel: Ipv4Addr,
    pub pods: Vec<PodDef>,
}

const fn pod(name: &'static str, namespace: &'static str, ip: [u8; 4], ambient: bool) -> PodDef {
    PodDef {
        name,
        namespace,
        ip: Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
        ambient,
    }
}

/// The article's node `ambient-worker2` with bookinfo, a non-ambient `sleep` pod, and the second
/// node `ambient-worker` with details-v1 and a non-ambient `curl`.
pub fn article_nodes() -> Vec<NodeDef> {
    vec![
        NodeDef {
            name: "ambient-worker2",
            cidr_octet: 2,
            underlay_ip: Ipv4Addr::new(172, 18, 0, 3),
            ztunnel: Ipv4Addr::new(10, 244, 2, 10),
            pods: vec![
                pod("productpage-v1", "default", [10, 244, 2, 3], true),
                pod("ratings-v1", "default", [10, 244, 2, 2], true),
                pod("reviews-v1", "default", [10, 244, 2, 7], true),
                pod("reviews-v2", "default", [10, 244, 2, 5], true),
                pod("reviews-v3", "default", [10, 244, 2, 8], true),
                pod("sleep", "legacy", [10, 244, 2, 20], false),
            ],
        },
        NodeDef {
            name: "ambient-worker",
            cidr_octet: 1,
            underlay_ip: Ipv4Addr::new(172, 18, 0, 2),
            ztunnel: Ipv4Addr::new(10, 244, 1, 19),
            pods: vec![
                pod("details-v1", "default", [10, 244, 1, 4], true),
                pod("curl", "legacy", [10, 244, 1, 21], false),
            ],
        },
    ]
}

/// The IPv6 address beside an IPv4 one of the article's plan: `10.244.N.M` is
/// `fd00:10:244:N::M`, `172.18.0.M` is `fd00:172:18::M`.
pub fn v6_of(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = v4.octets();
    let hex = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex");
    if a == 10 {
        Ipv6Addr::new(0xfd00, 0x10, hex(b), c as u16, 0, 0, 0, d as u16)
    } else {
        Ipv6Addr::new(0xfd00, hex(a), hex(b), 0, 0, 0, 0, d as u16)
    }
}

pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (dual stack).
    pub ip6: Ipv6Addr,
    pub ambient: bool,
    pub host_veth: String,
    pub ns: Netns,
}

impl Pod {
    /// Its eth0's MAC address.
    pub fn mac(&self) -> Result<[u8; 6]> {
        self.ns.exec(|| mac_of("eth0"))
    }
}

/// The MAC address of `ifname` in the calling thread's netns (asked of a socket made there:
/// sysfs shows the netns it was mounted in).
fn mac_of(ifname: &str) -> Result<[u8; 6]> {
    // SAFETY: an ifreq naming the interface, filled in by the ioctl; the socket is closed after.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(r == 0, "{ifname}: SIOCGIFHWADDR: {err}");
        let data = req.ifr_ifru.ifru_hwaddr.sa_data;
        Ok(std::array::from_fn(|i| data[i] as u8))
    }
}

pub struct Node {
    /// Unique per run (pins live under this name): `<prefix>-<article name>`.
    pub name: String,
    pub article_name: &'static str,
    pub gateway: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    pub underlay_ip: Ipv4Addr,
    pub ns: Netns,
    pub ztunnel: Pod,
    pub pods: BTreeMap<String, Pod>,
}

impl Node {
    /// The MAC address `pod` sends its routed frames to: its host veth's (ptp).
    pub fn gateway_mac(&self, pod: &Pod) -> Result<[u8; 6]> {
        let veth = pod.host_veth.clone();
        self.ns.exec(move || mac_of(&veth))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name} on {}", self.name))
    }

    /// The node description the agent reads: ztunnel and the ambient pods.
    pub fn pods_file(&self, with_ztunnel: bool) -> String {
        self.pods_file_without(with_ztunnel, &[])
    }

    fn ztunnel_line(&self, z: &Pod) -> String {
        let name = match z.name.as_str() {
            "ztunnel" => format!("ztunnel-{}", self.article_name),
            other => other.to_string(),
        };
        format!(
            "ztunnel: {{ name: {name}, ips: [{}, {}], netns: {} }}\n",
            z.ip,
            z.ip6,
            z.ns.path().display()
        )
    }

    /// The node description with the ambient pods named in `left` out of ambient.
    pub fn pods_file_without(&self, with_ztunnel: bool, left: &[&str]) -> String {
        let mut s = format!("node: {}\n", self.name);
        if with_ztunnel {
            s += &self.ztunnel_line(&self.ztunnel);
        }
        s += "pods:\n";
        for p in self
            .pods
            .values()
            .filter(|p| p.ambient && !left.contains(&p.name.as_str()))
        {
            s += &pod_line(p);
        }
        // The rest of the node's pods: outside the mesh, so a new veth of theirs is not held.
        s += "outside:\n";
        for p in self
            .pods
            .values()
            .filter(|p| !p.ambient || left.contains(&p.name.as_str()))
        {
            s += &pod_line(p);
        }
        s
    }
}

/// A pod's entry in a node description, with what in-pod mode also needs (uid as the XDS file
/// gives it, service account, netns).
fn pod_line(p: &Pod) -> String {
    format!(
        "  - {{ name: {}, namespace: {}, ips: [{}, {}], uid: \"{}\", serviceAccount: {}, netns: {} }}\n",
        p.name,
        p.namespace,
        p.ip,
        p.ip6,
        crate::ztunnel::workload_uid(p),
        crate::ztunnel::service_account(p),
        p.ns.path().display()
    )
}

pub struct Topology {
    pub prefix: String,
    // Pods before nodes: deleting a pod's netns removes its veth pair from the node too.
    pub nodes: Vec<Node>,
}

fn veth_name(node: &str, pod: &str) -> String {
    // Like the CNI's veth<8 hex>, stable for a pod.
    let h = format!("{node}/{pod}")
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
    format!("veth{:08x}", h as u32)
}

/// What the CNI does for a pod: a veth between the node and `pod_ns`, the pod's addresses, and
/// routes both ways (ptp: the host side holds the gateway address).
fn plug(
    node_ns: &Netns,
    gateway: Ipv4Addr,
    veth: &str,
    pod_ns: &Netns,
    ip: Ipv4Addr,
) -> Result<()> {
    let (gateway6, ip6) = (v6_of(gateway), v6_of(ip));
    ip_batch(
        &node_ns.name,
        &[format!(
            "link add {veth} type veth peer name eth0 netns {}",
            pod_ns.name
        )],
    )?;
    // A CNI's ADD returns once the pod's addresses have settled (containernetworking's
    // `SettleAddresses`). Until its link-local address has passed DAD, the kernel sends no
    // neighbour solicitation for a packet whose source is not an address of that link (what
    // ztunnel's transparent sockets send), so pods as young as the lab's would wait ~2 s.
    node_ns.sysctl(&format!("net.ipv6.conf.{veth}.accept_dad"), "0")?;
    pod_ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
    ip_batch(
        &node_ns.name,
        &[
            format!("addr add {gateway}/32 dev {veth}"),
            format!("addr add {gateway6}/128 dev {veth} nodad"),
            format!("link set {veth} up"),
            format!("route add {ip}/32 dev {veth} scope link src {gateway}"),
            format!("route add {ip6}/128 dev {veth} src {gateway6}"),
        ],
    )?;
    ip_batch(
        &pod_ns.name,
        &[
            format!("addr add {ip}/32 dev eth0"),
            format!("addr add {ip6}/128 dev eth0 nodad"),
            "link set eth0 up".into(),
            format!("route add {gateway} dev eth0 scope link"),
            format!("route add default via {gateway} dev eth0 src {ip}"),
            format!("route add {gateway6} dev eth0"),
            format!("route add default via {gateway6} dev eth0 src {ip6}"),
        ],
    )
}

impl Node {
    /// A pod that starts while the agent runs, in two steps so a test can send from it the
    /// moment it can: its netns first (`start_pod`), then the CNI's work (`plug_pod`).
    pub fn start_pod(
        &self,
        name: &str,
        namespace: &str,
        ip: Ipv4Addr,
        ambient: bool,
    ) -> Result<Pod> {
        Ok(Pod {
            name: name.into(),
            namespace: namespace.into(),
            ip,
            ip6: v6_of(ip),
            ambient,
            host_veth: veth_name(self.article_name, name),
            ns: Netns::new(&format!("{}-{name}", self.name))?,
        })
    }

    pub fn plug_pod(&self, pod: &Pod) -> Result<()> {
        plug(&self.ns, self.gateway, &pod.host_veth, &pod.ns, pod.ip)
    }

    /// The node description with `extra` pods (started with `start_pod`) as well.
    pub fn pods_file_with(&self, extra: &[&Pod]) -> String {
        self.pods_file_for(&self.ztunnel, extra)
    }

    /// With `ztunnel` as the node's ztunnel (a rolling update's new pod), and `extra` pods.
    pub fn pods_file_for(&self, ztunnel: &Pod, extra: &[&Pod]) -> String {
        let mut s = self.pods_file(true).replace(
            &self.ztunnel_line(&self.ztunnel),
            &self.ztunnel_line(ztunnel),
        );
        for p in extra {
            let entry = pod_line(p);
            let section = if p.ambient { "pods:\n" } else { "outside:\n" };
            s = s.replacen(section, &format!("{section}{entry}"), 1);
        }
        s
    }
}

impl Topology {
    pub fn article() -> Result<Self> {
        Self::build(article_nodes())
    }

    pub fn build(defs: Vec<NodeDef>) -> Result<Self> {
        let prefix = unique_prefix("t");
        let mut nodes = Vec::new();
        for def in &defs {
            nodes.push(
                build_node(&prefix, def).with_context(|| format!("building node {}", def.name))?,
            );
        }
        // The underlay: one veth between every pair of nodes is enough for two.
        if let [a, b] = &nodes[..] {
            let cmds = [format!(
                "link add ul0 netns {} type veth peer name ul0 netns {}",
                a.ns.name, b.ns.name
            )];
            ip_batch(&a.ns.name, &cmds)?;
            for (n, other, other_octet) in [(a, b, defs[1].cidr_octet), (b, a, defs[0].cidr_octet)]
            {
                ip_batch(
                    &n.ns.name,
                    &[
                        format!("addr add {}/16 dev ul0", n.underlay_ip),
                        format!("addr add {}/64 dev ul0 nodad", v6_of(n.underlay_ip)),
                        "link set ul0 up".into(),
                        format!(
                            "route add 10.244.{other_octet}.0/24 via {}",
                            other.underlay_ip
                        ),
                        format!(
                            "route add fd00:10:244:{other_octet}::/64 via {}",
                            v6_of(other.underlay_ip)
                        ),
                    ],
                )?;
            }
        }
        Ok(Topology { prefix, nodes })
    }

    pub fn node(&self, article_name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.article_name == article_name)
            .expect("node exists")
    }

    /// The article's node.
    pub fn worker2(&self) -> &Node {
        self.node("ambient-worker2")
    }

    pub fn worker(&self) -> &Node {
        self.node("ambient-worker")
    }
}

fn build_node(prefix: &str, def: &NodeDef) -> Result<Node> {
    let name = format!("{prefix}-{}", def.name);
    let ns = Netns::new(&name)?;
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ] {
        ns.sysctl(k, v)?;
    }
    let gateway = Ipv4Addr::new(10, 244, def.cidr_octet, 1);
    let gateway6 = v6_of(gateway);
    let make = |p: &PodDef| -> Result<Pod> {
        let pod_ns = Netns::new(&format!("{name}-{}", p.name))?;
        let veth = veth_name(def.name, p.name);
        plug(&ns, gateway, &veth, &pod_ns, p.ip)?;
        Ok(Pod {
            name: p.name.into(),
            namespace: p.namespace.into(),
            ip: p.ip,
            ip6: v6_of(p.ip),
            ambient: p.ambient,
            host_veth: veth,
            ns: pod_ns,
        })
    };
    let ztunnel = make(&PodDef {
        name: "ztunnel",
        namespace: "istio-system",
        ip: def.ztunnel,
        ambient: false,
    })?;
    let mut pods = BTreeMap::new();
    for p in &def.pods {
        pods.insert(p.name.to_string(), make(p)?);
    }
    Ok(Node {
        name,
        article_name: def.name,
        gateway,
        gateway6,
        underlay_ip: def.underlay_ip,
        ns,
        ztunnel,
        pods,
    })
}
