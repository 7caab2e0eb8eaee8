//! `bench --quick` end to end: every part of `cargo xtask bench` runs in the simulated nodes and
//! writes its tables. The sizes are far too small to mean anything, so no figure's value is
//! asserted, only that each was measured, and that the churn under eBPF capture lost nothing.
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

#[test]
fn the_bench_runs_every_part_and_writes_its_tables() -> Result<()> {
    let out = std::env::temp_dir().join(format!("zdivert-bench-smoke-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--quick", "--out"])
        .arg(&out)
        .status()
        .context("running the bench")?;
    let results = std::fs::read_to_string(out.join("results.json"));
    let md = std::fs::read_to_string(out.join("results.md"));
    let _ = std::fs::remove_dir_all(&out);
    assert!(status.success(), "bench --quick: {status}");
    let r: Value = serde_json::from_str(&results?)?;
    let figures = r["figures"].as_array().context("figures")?;
    let get = |case: &str, metric: &str| -> Option<f64> {
        figures
            .iter()
            .find(|f| f["case"] == case && f["metric"] == metric)
            .and_then(|f| f["median"].as_f64())
    };
    for side in ["same-node", "cross-node"] {
        for variant in ["a-direct", "b-ebpf", "c-iptables"] {
            let case = format!("{side}/{variant}");
            for metric in [
                "rr_p50",
                "rr_p99",
                "conn_per_s",
                "conn_p99",
                "bulk_1",
                "bulk_4",
            ] {
                let v = get(&case, metric).with_context(|| format!("{case} {metric} measured"))?;
                assert!(v.is_finite() && v > 0.0, "{case} {metric} = {v}");
            }
        }
        for variant in ["b-ebpf", "c-iptables"] {
            assert_eq!(
                get(&format!("{side}/{variant}"), "conn_failures"),
                Some(0.0),
                "{side}: churn through {variant} lost connections"
            );
        }
    }
    for mode in ["ebpf", "iptables"] {
        let case = format!("ztunnel-replacement/{mode}");
        for metric in [
            "long_lived_broken",
            "new_failed",
            "new_stalled",
            "new_total",
        ] {
            get(&case, metric).with_context(|| format!("{case} {metric} measured"))?;
        }
    }
    // eBPF keeps the replaced ztunnel's connections (the fallback does not, hence no claim).
    assert_eq!(
        get("ztunnel-replacement/ebpf", "long_lived_broken"),
        Some(0.0),
        "eBPF mode broke long-lived connections when ztunnel was replaced"
    );
    for pods in ["10 pods", "1000 pods", "10000 pods", "65536 pods (max)"] {
        for prog in [
            "zd_floor",
            "zd_outbound",
            "zd_inbound",
            "zd_zt_return",
            "zd_zt_tproxy",
            "zd_zt_tproxy (established)",
        ] {
            let case = format!("{pods}/{prog}");
            get(&case, "ns_per_packet").with_context(|| format!("{case} measured"))?;
        }
    }
    for prog in [
        "zd_pod_egress",
        "zd_pod_ingress",
        "zd_pod_ingress (established)",
    ] {
        let case = format!("in-pod/{prog}");
        get(&case, "ns_per_packet").with_context(|| format!("{case} measured"))?;
    }
    for (mode, metrics) in [
        (
            "ebpf",
            &["apply_from_empty", "apply_one_more", "agent_rss"][..],
        ),
        ("ebpf-clsact", &["apply_from_empty", "apply_one_more"][..]),
        (
            "iptables",
            &["apply_from_empty", "apply_one_more", "agent_rss"][..],
        ),
    ] {
        for metric in metrics {
            get(&format!("100 pods/{mode}"), metric)
                .with_context(|| format!("100 pods/{mode} {metric}"))?;
        }
    }
    let md = md?;
    assert!(
        md.contains("| target | wanted | measured |"),
        "the markdown table"
    );
    assert!(r["ratios"].as_array().is_some_and(|a| !a.is_empty()));
    Ok(())
}
