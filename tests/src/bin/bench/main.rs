//! `cargo xtask bench`: what each redirection path costs, side by side in one run. Prints the
//! tables and writes `bench/results.json` and `bench/results.md`.
//!
//! Usage: bench [--quick] [--rounds N]
//! [--only datapath|inpod|redirect|upgrade|rollout|cni|perpacket|control]
//! [--out DIR]
mod cni;
mod control;
mod datapath;
mod inpod_apply;
mod inpod_redirect;
mod perpacket;
mod report;
mod rollout;
mod stats;
mod upgrade;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};

struct Args {
    quick: bool,
    /// Only this part: datapath, inpod (redirect: its redirection-alone part), upgrade, perpacket
    /// or control.
    only: Option<String>,
    rounds: usize,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        only: None,
        rounds: 3,
        out: PathBuf::from("bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--rounds" => {
                a.rounds = it
                    .next()
                    .context("--rounds N")?
                    .parse()
                    .context("--rounds N")?
            }
            "--only" => {
                a.only = Some(it.next().context(
                    "--only datapath|inpod|redirect|upgrade|rollout|cni|perpacket|control",
                )?)
            }
            "--out" => a.out = it.next().context("--out DIR")?.into(),
            other => {
                bail!("unknown argument {other:?}; usage: bench [--quick] [--rounds N] [--out DIR]")
            }
        }
    }
    if a.quick {
        a.rounds = a.rounds.min(1);
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = args()?;
    let mut samples = stats::Samples::default();
    let sizes = if a.quick {
        datapath::Sizes {
            transactions: 200,
            churn: Duration::from_millis(300),
            bulk: Duration::from_millis(300),
            rounds: 1,
        }
    } else {
        datapath::Sizes {
            transactions: 5000,
            churn: Duration::from_secs(2),
            bulk: Duration::from_secs(2),
            rounds: a.rounds,
        }
    };
    let part = |name: &str| a.only.as_deref().is_none_or(|o| o == name);
    if part("datapath") {
        eprintln!("bench: data path ({} rounds)", sizes.rounds);
        datapath::run(&sizes, &mut samples)?;
    }
    if part("inpod") {
        eprintln!("bench: in-pod data path ({} rounds)", sizes.rounds);
        datapath::run_in_pod(&sizes, &mut samples)?;
    }
    if part("inpod") || a.only.as_deref() == Some("redirect") {
        eprintln!("bench: in-pod redirection alone ({} rounds)", sizes.rounds);
        inpod_redirect::run(&sizes, &mut samples)?;
    }
    if part("inpod") {
        let pods = if a.quick { 4 } else { 40 };
        eprintln!("bench: in-pod apply of one new pod ({pods} pods)");
        inpod_apply::run(pods, &mut samples)?;
    }
    if part("upgrade") {
        eprintln!("bench: ztunnel replacement ({} rounds)", sizes.rounds);
        upgrade::run(sizes.rounds, &mut samples)?;
    }
    if part("rollout") {
        let min = if a.quick { 1_000 } else { 10_000 };
        eprintln!(
            "bench: in-pod ztunnel rollouts ({} rounds, {min}+ connections)",
            sizes.rounds
        );
        rollout::run(sizes.rounds, min, &mut samples)?;
    }
    if part("cni") {
        let (singles, burst) = if a.quick { (3, 8) } else { (30, 100) };
        eprintln!("bench: CNI ADD ({singles} pods one at a time, a burst of {burst})");
        cni::run(singles, burst, &mut samples)?;
    }
    let repeat = if a.quick { 10_000 } else { 1_000_000 };
    if part("perpacket") {
        eprintln!("bench: per-packet cost ({repeat} repeats)");
        perpacket::run(repeat, if a.quick { 1 } else { 3 }, &mut samples)?;
    }
    let pods: &[u32] = if a.quick {
        &[100]
    } else {
        &[100, 1_000, 10_000]
    };
    if part("control") {
        eprintln!("bench: control path");
        control::run(pods, if a.quick { 1 } else { 3 }, &mut samples)?;
    }

    let figures = samples.figures();
    let command = if a.quick {
        "cargo xtask bench --quick".to_string()
    } else {
        format!("cargo xtask bench --rounds {}", a.rounds)
    };
    let r = report::Report::new(figures, &command);
    let md = r.markdown();
    println!("{md}");
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&r)?,
    )?;
    std::fs::write(a.out.join("results.md"), md)?;
    eprintln!(
        "bench: wrote {}/results.json and results.md",
        a.out.display()
    );
    Ok(())
}
