//! DNS capture (`--dns-capture`).

use super::super::{Lab, Mode};
use zdivert_tests::{
    apps::{UdpEcho, sa},
    ztunnel::MeshConfig,
};

/// `--dns-capture`: an ambient pod's DNS, over UDP and TCP, is answered by ztunnel's DNS proxy
/// (a name only ztunnel's config knows), from the address the pod asked (both families in-pod);
/// without the option DNS is untouched and reaches the server the pod asked.
pub fn dns_capture_answers_from_ztunnel_and_only_when_enabled(mode: Mode) -> anyhow::Result<()> {
    use zdivert_tests::dns::{resolve_tcp, resolve_udp};
    let vip = super::REVIEWS_VIP;
    let mesh = |_: &zdivert_tests::topology::Topology| MeshConfig {
        services: vec![super::reviews_service()],
        ..Default::default()
    };
    let name = "reviews.default.svc.cluster.local";
    for capture in [true, false] {
        let lab = if capture {
            Lab::real_with(
                mode,
                mesh,
                &[("ISTIO_META_DNS_CAPTURE", "true")],
                &["--dns-capture"],
            )?
        } else {
            Lab::real(mode, mesh)?
        };
        let (pp, sleep) = (lab.w2().pod("productpage-v1"), lab.w2().pod("sleep"));
        // The pod's nameserver is another pod here: whatever answers, answers as it.
        let server = sa(sleep.ip, 53);
        let echo = UdpEcho::start(&sleep.ns, 53)?;
        if capture {
            // IPv6 DNS is captured in in-pod mode only (node-level capture is IPv4).
            let server6 = sa(sleep.ip6, 53);
            let servers: &[_] = if mode.is_in_pod() {
                &[server, server6]
            } else {
                &[server]
            };
            for &server in servers {
                for (how, answer) in [
                    ("UDP", resolve_udp(&pp.ns, server, name)),
                    ("TCP", resolve_tcp(&pp.ns, server, name)),
                ] {
                    let (addr, from) = answer?;
                    assert_eq!(addr, vip, "{mode:?} {how} {server}: ztunnel resolved it");
                    assert_eq!(from, server, "{mode:?} {how}: answered as the server asked");
                }
            }
            assert_eq!(echo.received(), 0, "the pod's nameserver saw nothing");
        } else {
            let r = resolve_udp(&pp.ns, server, name);
            assert!(r.is_err(), "not a DNS server: only its echo answers: {r:?}");
            assert_eq!(echo.received(), 1, "DNS went where the pod sent it");
        }
    }
    Ok(())
}
