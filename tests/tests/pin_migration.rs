//! A node an agent of the previous version ran: its pins are in layout v2 (maps without BTF,
//! `PodEntry` with its `pod_mac`). The new agent takes it over under load without a failed
//! request: it copies the maps into the new layout, adopts the old TCX links (the same links,
//! now running its programs), and removes the old layout. Its maps then dump with named fields.
mod common;

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use common::{Lab, Mode};
use serde_json::Value;
use zdivert::dataplane::ebpf::PinDirs;
use zdivert_common::{BPFFS, IpKey, PIN_VERSION_BEFORE, PodEntry, map};
use zdivert_tests::{
    apps::{LongLived, RequestStream, TcpServer, sa},
    eventually,
    ztunnel::MeshConfig,
};

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output()?;
    ensure!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 pin path")
}

/// Rewrites the node's pinned state into layout v2, as an agent of that version left it: the
/// attachments' pins and the maps move, and `PODS` becomes a map of v2's 20-byte values.
fn downgrade_to_v2(node: &str) -> Result<()> {
    let (new, old) = (
        PinDirs::new(Path::new(BPFFS), node),
        PinDirs::of_version(Path::new(BPFFS), PIN_VERSION_BEFORE, node),
    );
    for (from, to) in [
        (&new.links, &old.links),
        (&new.filters, &old.filters),
        (&new.maps, &old.maps),
    ] {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            if e.file_name() != map::PODS {
                std::fs::rename(e.path(), to.join(e.file_name()))?;
            }
        }
    }
    let pods = Map::from_map_data(MapData::from_pin(new.maps.join(map::PODS))?)?;
    let pods: HashMap<_, IpKey, PodEntry> = pods.try_into()?;
    let v2_pods = old.maps.join(map::PODS);
    bpftool(&[
        "map",
        "create",
        path_str(&v2_pods),
        "type",
        "hash",
        "key",
        "16",
        "value",
        "20",
        "entries",
        "65536",
        "name",
        "PODS",
    ])?;
    let mut v2: HashMap<_, IpKey, [u8; 20]> =
        Map::from_map_data(MapData::from_pin(&v2_pods)?)?.try_into()?;
    for entry in pods.iter() {
        let (ip, pod) = entry?;
        let mut value = [0u8; 20];
        value[..4].copy_from_slice(&pod.host_ifindex.to_ne_bytes());
        value[4..8].copy_from_slice(&pod.flags.to_ne_bytes());
        // 8..14: the pod_mac nothing read.
        value[14..].copy_from_slice(&pod.host_mac);
        v2.insert(ip, value, 0)?;
    }
    std::fs::remove_file(new.maps.join(map::PODS))?;
    for d in [&new.links, &new.filters, &new.maps, &new.root] {
        std::fs::remove_dir(d)?;
    }
    Ok(())
}

/// Each TCX link pin: its name, link id and program id.
fn tcx_links(dirs: &PinDirs) -> Result<Vec<(String, u64, u64)>> {
    let mut out = vec![];
    for e in std::fs::read_dir(&dirs.links)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("lookup_") {
            continue; // the sk_lookup link is re-pinned, not adopted
        }
        let link = bpftool(&["link", "show", "pinned", path_str(&e.path())])?;
        let id = |k: &str| link[k].as_u64().with_context(|| format!("{k} in {link}"));
        out.push((name, id("id")?, id("prog_id")?));
    }
    out.sort();
    Ok(out)
}

fn previous_layout_is_taken_over_under_load(mode: Mode) -> Result<()> {
    let mut lab = Lab::real(mode, |_| MeshConfig::default())?;
    let node = lab.w2().name.clone();
    let w2 = lab.w2();
    let (pp, rv1) = (w2.pod("productpage-v1"), w2.pod("reviews-v1"));
    let details = lab.w1().pod("details-v1");
    let _servers = [
        TcpServer::start(&rv1.ns, "reviews-v1", 9080)?,
        TcpServer::start(&details.ns, "details-v1", 9080)?,
    ];
    let long = [
        LongLived::start(&pp.ns, sa(rv1.ip, 9080))?,
        LongLived::start(&details.ns, sa(rv1.ip, 9080))?,
    ];
    let short = [
        RequestStream::start(&pp.ns, sa(rv1.ip, 9080))?,
        RequestStream::start(&details.ns, sa(rv1.ip, 9080))?,
    ];
    short[0].wait_more(10)?;

    lab.agents[0].kill();
    downgrade_to_v2(&node)?;
    let (new, old) = (
        PinDirs::new(Path::new(BPFFS), &node),
        PinDirs::of_version(Path::new(BPFFS), PIN_VERSION_BEFORE, &node),
    );
    let before = if mode == Mode::Ebpf {
        tcx_links(&old)?
    } else {
        vec![]
    };
    // The old programs carry the traffic meanwhile.
    short[0].wait_more(10)?;

    lab.agents[0].restart()?;
    lab.wait_ready(lab.w2(), true)?;
    eventually("the old layout removed", Duration::from_secs(10), || {
        Ok(!old.root.exists())
    })?;
    for s in &short {
        s.wait_more(20)?;
    }
    for l in &long {
        l.wait_more(10)?;
    }

    if mode == Mode::Ebpf {
        let after = tcx_links(&new)?;
        assert_eq!(after.len(), before.len(), "{before:?} → {after:?}");
        for ((name, link, old_prog), (name2, link2, new_prog)) in before.iter().zip(&after) {
            assert_eq!((name, link), (name2, link2), "the same link, adopted");
            assert_ne!(old_prog, new_prog, "{name}: the new agent's program in it");
        }
    }
    // Named fields from the object's BTF, as an operator's `bpftool map dump` shows them.
    let dump = bpftool(&["map", "dump", "pinned", path_str(&new.maps.join(map::PODS))])?;
    let first = &dump[0]["formatted"];
    assert!(
        first["value"]["host_ifindex"].is_u64() && first["value"]["host_mac"].is_array(),
        "{dump}"
    );
    assert!(first["value"].get("pod_mac").is_none(), "{dump}");

    for (i, l) in long.into_iter().enumerate() {
        let results = l.stop();
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(failed.is_empty(), "long-lived connection {i}: {failed:?}");
    }
    for s in short {
        common::assert_none_failed(&s.stop(), 40);
    }
    Ok(())
}

#[test]
fn a_v2_node_is_taken_over_without_a_failed_request() -> Result<()> {
    previous_layout_is_taken_over_under_load(Mode::Ebpf)
}

#[test]
fn a_v2_node_in_clsact_mode_is_taken_over_without_a_failed_request() -> Result<()> {
    previous_layout_is_taken_over_under_load(Mode::EbpfClsact)
}
