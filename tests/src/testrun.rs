//! BPF_PROG_TEST_RUN through aya: runs a loaded classifier on a crafted frame and returns its
//! verdict, the frame as the program left it, and the mark it set.
use anyhow::Result;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

/// `struct __sk_buff` as u32 words; the kernel accepts only a few fields set.
const SKB_WORDS: usize = 48;
const SKB_MARK: usize = 2;
const SKB_INGRESS_IFINDEX: usize = 9;
const SKB_IFINDEX: usize = 10;

pub struct Outcome {
    /// The program's return value, as the signed TC verdict.
    pub verdict: i32,
    pub frame: Vec<u8>,
    pub mark: u32,
    /// Run time per repetition.
    pub ns_per_run: u128,
}

fn bytes(words: &[u32; SKB_WORDS]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Where a frame comes from, as the kernel records it (`skb_iif`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrived {
    /// Received on the device the program runs on.
    OnTheDevice,
    /// Sent by the node's own stack: received on no device.
    FromTheNode,
}

/// Runs `prog` on `frame` as if it were on `ifindex` (which must exist in the calling thread's
/// netns; 0 for none) carrying `mark`.
pub fn run(
    prog: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    arrived: Arrived,
    mark: u32,
    repeat: u32,
) -> Result<Outcome> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut ctx = [0u32; SKB_WORDS];
    ctx[SKB_IFINDEX] = ifindex;
    if arrived == Arrived::OnTheDevice {
        ctx[SKB_INGRESS_IFINDEX] = ifindex;
    }
    ctx[SKB_MARK] = mark;
    let ctx_in = bytes(&ctx);
    let mut ctx_out = vec![0u8; ctx_in.len()];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        repeat,
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    let m = SKB_MARK * 4;
    Ok(Outcome {
        verdict: r.return_value as i32,
        frame: out,
        mark: u32::from_ne_bytes(ctx_out[m..m + 4].try_into()?),
        ns_per_run: r.duration.as_nanos(),
    })
}

/// Makes `ips` the node's addresses in a loaded object's maps, as the agent writes them: each in
/// `NODE_IPS`, and its bit in the filter the programs test first.
pub fn set_node_ips(ebpf: &mut aya::Ebpf, ips: &[zdivert_common::IpKey]) -> Result<()> {
    use aya::maps::{Array, HashMap};
    use zdivert_common::{IpKey, NODE_IP_LOCAL, map};
    let mut node: HashMap<_, IpKey, u32> = HashMap::try_from(ebpf.map_mut(map::NODE_IPS).unwrap())?;
    for ip in ips {
        node.insert(ip, NODE_IP_LOCAL, 0)?;
    }
    let mut filter: Array<_, u64> = Array::try_from(ebpf.map_mut(map::NODE_IP_FILTER).unwrap())?;
    for (i, word) in (0..).zip(zdivert::dataplane::ebpf::maps::node_ip_filter(ips)) {
        filter.set(i, word, 0)?;
    }
    Ok(())
}
