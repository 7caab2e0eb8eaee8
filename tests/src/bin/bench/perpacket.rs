//! Per-packet cost of each program (BPF_PROG_TEST_RUN, the kernel's own per-run timing) with
//! 10, 1k, 10k and the maximum number of pods in the map, against a program that does nothing.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Result, ensure};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap},
    programs::SchedClassifier,
};
use zdivert_common::{
    IpKey, MARK_OUTBOUND, NODE_IP_LOCAL, POD_F_V4, PODS_MAX_ENTRIES, PodEntry, ZTUNNEL_F_PRESENT,
    ZTUNNEL_F_V4, ZtunnelEntry,
};
use zdivert_tests::{
    ns::{Netns, unique_prefix},
    packets::{SYN, V4, eth, tcp},
    testrun,
};

use crate::stats::Samples;

fn syn(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &V4::new(src, dst, 6).packet(&tcp(40000, 9080, SYN)),
    )
}

const FLOOR: &str = "zd_floor";

fn key(ip: Ipv4Addr) -> IpKey {
    IpKey::from_v4(ip.octets())
}

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(repeat: u32, rounds: usize, samples: &mut Samples) -> Result<()> {
    let ns = Netns::new(&unique_prefix("bpp"))?;
    ns.ip("link add name zda type veth peer name zdb")?;
    let pins = PinDir(Path::new(zdivert_common::BPFFS).join(&ns.name));
    std::fs::create_dir_all(&pins.0)?;
    let pin_dir = pins.0.clone();
    let results = ns.exec(move || -> Result<Vec<(String, &'static str, f64)>> {
        // SAFETY: if_nametoindex on NUL-terminated literals.
        let (a, b) = unsafe {
            (
                libc::if_nametoindex(c"zda".as_ptr()),
                libc::if_nametoindex(c"zdb".as_ptr()),
            )
        };
        ensure!(a > 0 && b > 0, "veths in the bench netns");
        let mut ebpf =
            zdivert::dataplane::ebpf::loader(&pin_dir).load(zdivert::dataplane::ebpf::object())?;
        // The floor is an object of its own: nothing bench-only goes into the agent's.
        let mut floor = EbpfLoader::new().load(&zdivert_tests::floor_object()?)?;
        let floor: &mut SchedClassifier = floor.program_mut(FLOOR).unwrap().try_into()?;
        floor.load()?;
        let (pp, rv1, remote, zt) = (
            Ipv4Addr::new(10, 244, 2, 3),
            Ipv4Addr::new(10, 244, 2, 7),
            Ipv4Addr::new(10, 244, 1, 4),
            Ipv4Addr::new(10, 244, 2, 10),
        );
        {
            let mut node: HashMap<_, IpKey, u32> =
                HashMap::try_from(ebpf.map_mut("NODE_IPS").unwrap())?;
            node.insert(key(Ipv4Addr::new(10, 244, 2, 1)), NODE_IP_LOCAL, 0)?;
            let mut z: Array<_, ZtunnelEntry> = Array::try_from(ebpf.map_mut("ZTUNNEL").unwrap())?;
            z.set(
                0,
                ZtunnelEntry {
                    host_ifindex: b,
                    flags: ZTUNNEL_F_PRESENT | ZTUNNEL_F_V4,
                    ipv4: zt.octets(),
                    mac: [2, 0x7a, 0, 0, 0, 0x10],
                    _reserved: [0; 2],
                    ipv6: [0; 16],
                },
                0,
            )?;
        }
        let entry = |ifindex| PodEntry {
            host_ifindex: ifindex,
            flags: POD_F_V4,
            _reserved: [0; 2],
            host_mac: [2; 6],
        };
        let cases: [(&str, Vec<u8>, u32); 5] = [
            (FLOOR, syn(pp, rv1), 0),
            ("zd_outbound", syn(pp, rv1), 0),
            ("zd_inbound", syn(remote, pp), 0),
            ("zd_zt_return", syn(remote, rv1), 0),
            ("zd_zt_tproxy", syn(pp, rv1), MARK_OUTBOUND),
        ];
        // In-pod programs look up no pod map: measured once. A listener on :15006 as in-pod
        // ztunnel binds it, so the ingress program takes its whole path (lookups, assignment).
        let in_pod: [(&str, Vec<u8>); 2] = [
            ("zd_pod_egress", syn(pp, rv1)),
            ("zd_pod_ingress", syn(remote, pp)),
        ];
        // Marked as ztunnel marks its sockets: the in-pod program gives segments to no other.
        let listen = |port: u16| -> Result<socket2::Socket> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_mark(zdivert_common::MARK_INPOD_ZTUNNEL)?;
            s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s.listen(8)?;
            Ok(s)
        };
        let _listeners = [listen(15001)?, listen(15006)?];
        for prog in cases[1..]
            .iter()
            .map(|c| c.0)
            .chain(in_pod.iter().map(|c| c.0))
        {
            let p: &mut SchedClassifier = ebpf.program_mut(prog).unwrap().try_into()?;
            p.load()?;
        }
        let mut out = vec![];
        for _ in 0..rounds {
            for (prog, frame) in &in_pod {
                let p: &SchedClassifier = ebpf.program(prog).unwrap().try_into()?;
                let o = testrun::run(p, frame, a, testrun::Arrived::OnTheDevice, 0, repeat)?;
                out.push((
                    format!("in-pod/{prog}"),
                    "ns_per_packet",
                    o.ns_per_run as f64,
                ));
            }
        }
        let mut filled = 0u32;
        for pods in [10u32, 1_000, 10_000, PODS_MAX_ENTRIES] {
            {
                let mut map: HashMap<_, IpKey, PodEntry> =
                    HashMap::try_from(ebpf.map_mut("PODS").unwrap())?;
                // The two pods the frames use, and fillers up to `pods` entries.
                map.insert(key(pp), entry(a), 0)?;
                map.insert(key(rv1), entry(b), 0)?;
                while filled + 2 < pods {
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + filled);
                    map.insert(key(ip), entry(a), 0)?;
                    filled += 1;
                }
            }
            let label = match pods {
                PODS_MAX_ENTRIES => format!("{pods} pods (max)"),
                n => format!("{n} pods"),
            };
            for _ in 0..rounds {
                for (prog, frame, mark) in &cases {
                    let p: &SchedClassifier = match *prog {
                        FLOOR => floor,
                        _ => ebpf.program(prog).unwrap().try_into()?,
                    };
                    let o =
                        testrun::run(p, frame, a, testrun::Arrived::OnTheDevice, *mark, repeat)?;
                    out.push((
                        format!("{label}/{prog}"),
                        "ns_per_packet",
                        o.ns_per_run as f64,
                    ));
                }
            }
        }
        Ok(out)
    })?;
    for (case, metric, v) in results {
        samples.add("per_packet", &case, metric, "ns", v);
    }
    Ok(())
}
