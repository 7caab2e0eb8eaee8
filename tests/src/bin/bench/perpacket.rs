//! Per-packet cost of each program (BPF_PROG_TEST_RUN, the kernel's own per-run timing) with
//! 10, 1k, 10k and the maximum number of pods in the map, against a program that does nothing.
//! Each program takes a SYN, its costliest path; the two tproxy programs also a segment of an
//! established connection (every packet after the handshake), checked by its counter to have
//! taken that path.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Result, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray},
    programs::SchedClassifier,
};
use zdivert_common::{
    Counter, IpKey, MARK_INPOD_ZTUNNEL, MARK_OUTBOUND, POD_F_V4, PODS_MAX_ENTRIES, PodEntry,
    ZTUNNEL_F_PRESENT, ZTUNNEL_F_V4, ZtunnelEntry, counter::TP_TO_STACK,
    pod_counter::INGRESS_DROP_ASSIGN_REFUSED,
};
use zdivert_tests::{
    ns::{Netns, unique_prefix},
    packets::{ACK, SYN, V4, eth, tcp},
    testrun,
};

use crate::stats::Samples;

fn syn(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    segment((src, 40000), (dst, 9080), SYN)
}

fn segment(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &V4::new(src.0, dst.0, 6).packet(&tcp(src.1, dst.1, flags)),
    )
}

const FLOOR: &str = "zd_floor";
/// The cases of established segments: the program's name, then what it takes.
const TPROXY_ESTABLISHED: &str = "zd_zt_tproxy (established)";
const INGRESS_ESTABLISHED_CASE: &str = "zd_pod_ingress (established)";

/// A TCP connection inside the bench netns from `client` to `server`, its two ends kept open
/// while they live: the server's end is the socket a segment from `client` to `server` belongs
/// to, and it carries `mark` from its listener.
fn connection(
    client: (Ipv4Addr, u16),
    server: (Ipv4Addr, u16),
    mark: u32,
) -> Result<[std::net::TcpStream; 2]> {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    listener.set_mark(mark)?;
    listener.bind(&std::net::SocketAddr::from(server).into())?;
    listener.listen(1)?;
    let c = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    c.bind(&std::net::SocketAddr::from(client).into())?;
    c.connect(&std::net::SocketAddr::from(server).into())?;
    let (accepted, _) = listener.accept()?;
    Ok([c.into(), accepted.into()])
}

/// The program a case runs: the case's first word.
fn program<'a>(ebpf: &'a Ebpf, case: &str) -> Result<&'a SchedClassifier> {
    let name = case.split(' ').next().unwrap_or(case);
    Ok(ebpf.program(name).unwrap().try_into()?)
}

/// `counter` summed over CPUs.
fn counted(ebpf: &Ebpf, counter: Counter) -> Result<u64> {
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map("PACKET_STATS").unwrap())?;
    Ok(stats.get(&counter.0, 0)?.iter().sum())
}

/// Runs `frame` once and checks that it took the path `counter` counts.
fn check_path(
    ebpf: &Ebpf,
    prog: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    mark: u32,
    counter: Counter,
) -> Result<()> {
    let before = counted(ebpf, counter)?;
    let o = testrun::run(prog, frame, ifindex, testrun::Arrived::OnTheDevice, mark, 1)?;
    ensure!(
        counted(ebpf, counter)? == before + 1,
        "an established segment did not take its path ({counter:?} not counted; verdict {})",
        o.verdict
    );
    Ok(())
}

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
    let (pp, rv1, remote, zt) = (
        Ipv4Addr::new(10, 244, 2, 3),
        Ipv4Addr::new(10, 244, 2, 7),
        Ipv4Addr::new(10, 244, 1, 4),
        Ipv4Addr::new(10, 244, 2, 10),
    );
    // The established segments' connections are local ones between these addresses.
    ns.ip("link set lo up")?;
    for a in [pp, rv1, remote] {
        ns.ip(&format!("addr add {a}/32 dev lo"))?;
    }
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
        {
            testrun::set_node_ips(&mut ebpf, &[key(Ipv4Addr::new(10, 244, 2, 1))])?;
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
        // ztunnel's accepted socket of an outbound connection (node level), and in-pod one
        // accepted by a listener marked as ztunnel marks its own; ports apart from the SYNs'.
        let node_conn = ((pp, 40002), (rv1, 9082));
        let inpod_conn = ((remote, 40003), (pp, 9083));
        let _conns = [
            connection(node_conn.0, node_conn.1, 0)?,
            connection(inpod_conn.0, inpod_conn.1, MARK_INPOD_ZTUNNEL)?,
        ];
        let established = |(src, dst)| segment(src, dst, ACK);
        let cases: [(&str, Vec<u8>, u32); 6] = [
            (FLOOR, syn(pp, rv1), 0),
            ("zd_outbound", syn(pp, rv1), 0),
            ("zd_inbound", syn(remote, pp), 0),
            ("zd_zt_return", syn(remote, rv1), 0),
            ("zd_zt_tproxy", syn(pp, rv1), MARK_OUTBOUND),
            (TPROXY_ESTABLISHED, established(node_conn), MARK_OUTBOUND),
        ];
        // In-pod programs look up no pod map: measured once. A listener on :15006 as in-pod
        // ztunnel binds it, so the ingress program takes its whole path: its lookups, up to the
        // assignment (see `check_path`).
        let in_pod: [(&str, Vec<u8>); 3] = [
            ("zd_pod_egress", syn(pp, rv1)),
            ("zd_pod_ingress", syn(remote, pp)),
            (INGRESS_ESTABLISHED_CASE, established(inpod_conn)),
        ];
        // Marked as ztunnel marks its sockets: the in-pod program gives segments to no other.
        let listen = |port: u16| -> Result<socket2::Socket> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_mark(zdivert_common::MARK_INPOD_ZTUNNEL)?;
            s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s.listen(8)?;
            Ok(s)
        };
        for prog in ["zd_outbound", "zd_inbound", "zd_zt_return", "zd_zt_tproxy"]
            .into_iter()
            .chain(["zd_pod_egress", "zd_pod_ingress"])
        {
            let p: &mut SchedClassifier = ebpf.program_mut(prog).unwrap().try_into()?;
            p.load()?;
        }
        // Checked before ztunnel's listeners exist: the in-pod segment then reaches an
        // assignment only if it found its connection's socket. (A test run's skb is not at tc
        // ingress, so the kernel refuses every `bpf_sk_assign`; the figures include everything up
        // to that call.) At node level the segment goes to the stack's own lookup.
        let (tproxy_frame, ingress_frame) = (&cases[5].1, &in_pod[2].1);
        let tproxy = program(&ebpf, TPROXY_ESTABLISHED)?;
        check_path(&ebpf, tproxy, tproxy_frame, a, MARK_OUTBOUND, TP_TO_STACK)?;
        let ingress = program(&ebpf, INGRESS_ESTABLISHED_CASE)?;
        check_path(
            &ebpf,
            ingress,
            ingress_frame,
            a,
            0,
            INGRESS_DROP_ASSIGN_REFUSED,
        )?;
        let _listeners = [listen(15001)?, listen(15006)?];
        let mut out = vec![];
        for _ in 0..rounds {
            for (prog, frame) in &in_pod {
                let p = program(&ebpf, prog)?;
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
                    let p = match *prog {
                        FLOOR => floor,
                        _ => program(&ebpf, prog)?,
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
