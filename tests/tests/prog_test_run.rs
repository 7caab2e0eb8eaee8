//! Each program run by the kernel (BPF_PROG_TEST_RUN) on crafted frames: the verdict it returns
//! and the bytes it rewrote. Runs inside a netns of its own (the frames "arrive" on its veths);
//! the maps are pinned under a directory of this test's own, removed afterwards.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap},
    programs::SchedClassifier,
};
use zdivert_common::{
    IpKey, MARK_MASK, MARK_OUTBOUND, MARK_TPROXY, POD_F_V4, PodEntry, TCX_NEXT, ZTUNNEL_F_PRESENT,
    ZTUNNEL_F_V4, ZtunnelEntry,
};
use zdivert_tests::{
    ns::{Netns, unique_prefix},
    packets::{ACK, SYN, V4, eth, tcp, udp, v6},
    testrun,
};

const REDIRECT: i32 = 7;
const SHOT: i32 = 2;
const OK: i32 = 0;
const ZMAC: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 0x10];
const GW_MAC_7: [u8; 6] = [0x02, 0x67, 0, 0, 0, 0x07];
const IPV4: u16 = 0x0800;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn key(s: &str) -> IpKey {
    IpKey::from_v4(ip(s).octets())
}

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (program, frame, arriving mark) → (verdict, frame out, mark out), all within the netns.
type Case = (&'static str, &'static str, Vec<u8>, u32);

#[test]
fn programs_give_the_right_verdicts_and_rewrite_the_right_bytes() -> anyhow::Result<()> {
    let ns = Netns::new(&unique_prefix("run"))?;
    ns.ip("link add name zda type veth peer name zdb")?;
    let pins = PinDir(Path::new(zdivert_common::BPFFS).join(&ns.name));
    std::fs::create_dir_all(&pins.0)?;
    let pin_dir = pins.0.clone();

    let pp = ip("10.244.2.3");
    let rv1 = ip("10.244.2.7");
    let remote = ip("10.244.1.4");
    let frame = |src: Ipv4Addr, dst: Ipv4Addr, l4: Vec<u8>, proto: u8| {
        eth(
            [0xaa; 6],
            [0xbb; 6],
            IPV4,
            &V4::new(src, dst, proto).packet(&l4),
        )
    };
    let syn = |src, dst| frame(src, dst, tcp(40000, 9080, SYN), 6);
    let mut with_options = V4::new(pp, rv1, 6);
    with_options.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let mut fragment = V4::new(pp, rv1, 6);
    fragment.frag = 0x2000; // more fragments, offset 0
    let v6_syn = v6(
        "fd00:10:244:2::3".parse::<Ipv6Addr>()?,
        "fd00:10:244:2::7".parse()?,
        &[],
        6,
        &tcp(40000, 9080, SYN),
    );
    let v6_ext = v6(
        "fe80::1".parse::<Ipv6Addr>()?,
        "ff02::1".parse()?,
        &[
            (0, vec![0, 0, 1, 4, 0, 0, 0, 0]),
            (44, vec![0, 0, 0, 1, 0, 0, 0, 1]),
        ],
        58,
        &[128, 0, 0, 0],
    );
    let arp = eth([0xff; 6], [0xbb; 6], 0x0806, &[0u8; 28]);
    // The kernel's test run refuses a frame shorter than an IPv4 header, so: a header whose IHL
    // claims 40 bytes of options that are not there (the TCP header is then past the end).
    let mut lying = V4::new(pp, rv1, 6).packet(&[]);
    lying[0] = 0x4f;
    let truncated = eth([0xaa; 6], [0xbb; 6], IPV4, &lying);
    let tcp_truncated = frame(pp, rv1, vec![0x9c, 0x40, 0x23, 0x78], 6);

    let cases: Vec<Case> = vec![
        ("zd_outbound", "TCP SYN to another pod", syn(pp, rv1), 0),
        (
            "zd_outbound",
            "TCP with IPv4 options",
            eth(
                [0xaa; 6],
                [0xbb; 6],
                IPV4,
                &with_options.packet(&tcp(1, 9080, ACK)),
            ),
            0,
        ),
        (
            "zd_outbound",
            "forged source: another pod's address",
            syn(rv1, remote),
            0,
        ),
        (
            "zd_outbound",
            "forged source: not a pod",
            syn(ip("10.244.2.99"), remote),
            0,
        ),
        (
            "zd_outbound",
            "IPv6 TCP from an address not the pod's",
            eth([0xaa; 6], [0xbb; 6], 0x86dd, &v6_syn),
            0,
        ),
        (
            "zd_outbound",
            "IPv6 link-local ICMPv6 behind extension headers",
            eth([0xaa; 6], [0xbb; 6], 0x86dd, &v6_ext),
            0,
        ),
        ("zd_outbound", "ARP", arp.clone(), 0),
        (
            "zd_outbound",
            "IPv4 header longer than the frame",
            truncated.clone(),
            0,
        ),
        ("zd_outbound", "truncated TCP header", tcp_truncated, 0),
        (
            "zd_outbound",
            "TCP fragment",
            eth(
                [0xaa; 6],
                [0xbb; 6],
                IPV4,
                &fragment.packet(&tcp(1, 9080, SYN)),
            ),
            0,
        ),
        (
            "zd_outbound",
            "UDP (DNS)",
            frame(pp, ip("10.96.0.10"), udp(5353, 53), 17),
            0,
        ),
        (
            "zd_outbound",
            "TCP to the node",
            syn(pp, ip("10.244.2.1")),
            0,
        ),
        (
            "zd_outbound",
            "TCP to ztunnel itself",
            syn(pp, ip("10.244.2.10")),
            0,
        ),
        (
            "zd_inbound",
            "TCP from another node's pod",
            syn(remote, pp),
            0,
        ),
        (
            "zd_inbound",
            "TCP from the node (probe)",
            syn(ip("10.244.2.1"), pp),
            0,
        ),
        ("zd_inbound", "UDP", frame(remote, pp, udp(53, 5353), 17), 0),
        ("zd_inbound", "ARP", arp, 0),
        (
            "zd_inbound",
            "IPv4 header longer than the frame",
            truncated,
            0,
        ),
        (
            "zd_zt_return",
            "TCP to an ambient pod (spoofed source)",
            syn(remote, rv1),
            0,
        ),
        (
            "zd_zt_return",
            "TCP to another node",
            syn(ip("10.244.2.10"), remote),
            0,
        ),
        (
            "zd_zt_tproxy",
            "TCP addressed to ztunnel itself",
            syn(remote, ip("10.244.2.10")),
            0,
        ),
        (
            "zd_zt_tproxy",
            "captured TCP with no ztunnel listener",
            syn(pp, rv1),
            MARK_OUTBOUND,
        ),
        (
            "zd_zt_tproxy",
            "captured segment of a connection",
            frame(pp, rv1, tcp(40000, 9080, ACK), 6),
            MARK_OUTBOUND,
        ),
    ];

    let results = ns.exec(move || -> anyhow::Result<Vec<(String, testrun::Outcome)>> {
        // The interfaces the frames "arrive" on, looked up in this thread's netns.
        let (a, b) = unsafe {
            (
                libc::if_nametoindex(c"zda".as_ptr()),
                libc::if_nametoindex(c"zdb".as_ptr()),
            )
        };
        anyhow::ensure!(a > 0 && b > 0, "veths zda/zdb in the test netns");
        let mut ebpf =
            zdivert::dataplane::ebpf::loader(&pin_dir).load(zdivert::dataplane::ebpf::object())?;
        let mut pods: HashMap<_, IpKey, PodEntry> =
            HashMap::try_from(ebpf.map_mut("PODS").unwrap())?;
        pods.insert(
            key("10.244.2.3"),
            PodEntry {
                host_ifindex: a,
                flags: POD_F_V4,
                _reserved: [0; 2],
                host_mac: [2; 6],
            },
            0,
        )?;
        pods.insert(
            key("10.244.2.7"),
            PodEntry {
                host_ifindex: b,
                flags: POD_F_V4,
                _reserved: [0; 2],
                host_mac: GW_MAC_7,
            },
            0,
        )?;
        testrun::set_node_ips(&mut ebpf, &[key("10.244.2.1")])?;
        let mut zt: Array<_, ZtunnelEntry> = Array::try_from(ebpf.map_mut("ZTUNNEL").unwrap())?;
        zt.set(
            0,
            ZtunnelEntry {
                host_ifindex: b,
                flags: ZTUNNEL_F_PRESENT | ZTUNNEL_F_V4,
                ipv4: [10, 244, 2, 10],
                mac: ZMAC,
                _reserved: [0; 2],
                ipv6: [0; 16],
            },
            0,
        )?;
        let mut out = Vec::new();
        for (prog, what, frame, mark) in cases {
            let p: &mut SchedClassifier = ebpf.program_mut(prog).unwrap().try_into()?;
            if p.fd().is_err() {
                p.load()?;
            }
            let what = format!("{prog}: {what}");
            // The probe is the one frame the node's own stack sends; the rest arrived on a device.
            let arrived = match what.contains("from the node") {
                true => testrun::Arrived::FromTheNode,
                false => testrun::Arrived::OnTheDevice,
            };
            let o = testrun::run(p, &frame, a, arrived, mark, 1)
                .map_err(|e| e.context(what.clone()))?;
            out.push((what, o));
        }
        Ok(out)
    })?;

    let verdicts: Vec<(String, i32)> = results
        .iter()
        .map(|(w, o)| (w.clone(), o.verdict))
        .collect();
    let expect = [
        REDIRECT, REDIRECT, SHOT, SHOT, SHOT, TCX_NEXT, TCX_NEXT, SHOT, SHOT, SHOT, TCX_NEXT,
        TCX_NEXT, TCX_NEXT, REDIRECT, TCX_NEXT, TCX_NEXT, TCX_NEXT, SHOT, REDIRECT, TCX_NEXT,
        TCX_NEXT, SHOT, OK,
    ];
    let want: Vec<(String, i32)> = verdicts
        .iter()
        .zip(expect)
        .map(|((w, _), e)| (w.clone(), e))
        .collect();
    assert_eq!(verdicts, want);

    let get = |what: &str| &results.iter().find(|(w, _)| w.ends_with(what)).unwrap().1;
    // Outbound: addressed to ztunnel's eth0, and marked as outbound for the tproxy program.
    let o = get("zd_outbound: TCP SYN to another pod");
    assert_eq!(o.frame[..6], ZMAC);
    assert_eq!(o.mark & MARK_OUTBOUND, MARK_OUTBOUND);
    assert_eq!(get("TCP with IPv4 options").frame[..6], ZMAC);
    // Inbound: addressed to ztunnel's eth0 too.
    assert_eq!(
        get("zd_inbound: TCP from another node's pod").frame[..6],
        ZMAC
    );
    // Return: the pod sees its gateway's MAC as source; the rest of the frame is untouched.
    let r = get("TCP to an ambient pod (spoofed source)");
    assert_eq!(r.frame[6..12], GW_MAC_7);
    assert_eq!(r.frame[12..], syn(remote, rv1)[12..]);
    // A segment of a connection is routed to ztunnel's local sockets by the tproxy mark alone
    // (the stack's lookup finds its socket).
    assert_eq!(
        get("captured segment of a connection").mark & MARK_MASK,
        MARK_TPROXY
    );
    // Passed frames are not modified.
    assert_eq!(
        get("zd_outbound: UDP (DNS)").frame,
        frame(pp, ip("10.96.0.10"), udp(5353, 53), 17)
    );
    drop(pins);
    Ok(())
}
