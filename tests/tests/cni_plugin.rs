//! `zdivert-cni` and `zdivert install-cni` on their own, as binaries: bad input gets a CNI
//! error naming it and changes nothing; install-cni chains the plugin into the primary
//! configuration, keeps it there, and takes it out only on an uninstall.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use serde_json::json;
use zdivert_tests::{TempDir, cni::Sandbox, eventually, fakeapi::FakeApi, inpod::redirection_in};

const NEWCOMER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 60);

/// The `type` of each plugin of the conflist at `path`, in order.
fn plugin_types(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(v["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["type"].as_str().unwrap_or_default().to_string())
        .collect())
}

/// `zdivert install-cni`, as the DaemonSet's container runs it: the plugin copied into the bin
/// directory, the primary's single `.conf` turned into a list that ends with the plugin, the
/// entry put back when the primary rewrites its file, and `--uninstall` leaving the primary's
/// list as it was.
#[test]
fn install_cni_chains_the_plugin_and_keeps_it_chained() -> anyhow::Result<()> {
    let dir = TempDir::new("zdivert-install-cni")?;
    let (bin, conf) = (dir.0.join("bin"), dir.0.join("net.d"));
    std::fs::create_dir_all(&conf)?;
    let primary = json!({"cniVersion": "0.4.0", "name": "kindnet", "type": "ptp",
                         "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"}});
    std::fs::write(conf.join("10-kindnet.conf"), primary.to_string())?;
    let zdivert = zdivert_tests::agent::zdivert_bin();
    let mut child = Command::new(&zdivert)
        .args(["install-cni", "--plugin"])
        .arg(zdivert_tests::cni::plugin_bin())
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let list = conf.join("10-kindnet.conflist");
    let plugins = plugin_types;
    // Chaining follows the copy of the plugin (a debug build: over 200 MB), which under
    // emulation (vmtest, 5.10) took over 10 s.
    let chained = eventually("chained", zdivert_tests::SET_UP_WITHIN, || {
        Ok(list.exists() && plugins(&list)? == ["ptp", "zdivert-cni"])
    });
    let installed = bin.join("zdivert-cni");
    let rewritten = chained.and_then(|()| {
        anyhow::ensure!(!conf.join("10-kindnet.conf").exists(), "the .conf stayed");
        anyhow::ensure!(installed.exists(), "no plugin in the bin directory");
        // The primary CNI's agent restarts and writes its list again.
        std::fs::write(
            &list,
            json!({"cniVersion": "0.4.0", "name": "kindnet",
                                     "plugins": [primary.clone()]})
            .to_string(),
        )?;
        eventually("chained again", Duration::from_secs(10), || {
            Ok(plugins(&list)? == ["ptp", "zdivert-cni"])
        })
    });
    let _ = child.kill();
    let _ = child.wait();
    rewritten?;
    let out = Command::new(&zdivert)
        .args(["install-cni", "--uninstall", "--conf-dir"])
        .arg(&conf)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(plugins(&list)?, ["ptp"]);
    Ok(())
}

/// Bad input to the real plugin binary, each answered with a CNI error that names it, and
/// nothing applied in the pod's netns: malformed stdin, an unknown CNI version, a missing
/// netns, an agent that answers garbage, and one that takes the request and never answers.
#[test]
fn bad_input_gets_a_cni_error_naming_it_and_changes_nothing() -> anyhow::Result<()> {
    use std::{io::Read as _, io::Write as _, os::unix::net::UnixListener};
    let dir = TempDir::new("zdivert-cni-bad")?;
    // A pod netns as the primary plugin leaves it: eth0 with the pod's address.
    let ns = zdivert_tests::ns::Netns::new(&zdivert_tests::ns::unique_prefix("cnibad"))?;
    ns.ip("link add eth0 type veth peer name peer0")?;
    ns.ip(&format!("addr add {NEWCOMER}/24 dev eth0"))?;
    ns.ip("link set eth0 up")?;
    let pod = Sandbox {
        pod: zdivert_tests::topology::Pod {
            name: "web-0".into(),
            namespace: "default".into(),
            ip: NEWCOMER,
            ip6: zdivert_tests::topology::v6_of(NEWCOMER),
            ambient: true,
            host_veth: String::new(),
            ns,
        },
        uid: "u-1".into(),
        container_id: "c0ffee".into(),
        result: None,
    };
    // Agents that misbehave, each on its own socket.
    let garbage = dir.0.join("garbage.sock");
    let silent = dir.0.join("silent.sock");
    for (path, answer) in [
        (&garbage, Some("HTTP/1.1 400 Bad Request\r\n")),
        (&silent, None),
    ] {
        let listener = UnixListener::bind(path)?;
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                match answer {
                    Some(a) => {
                        let _ = conn.write_all(a.as_bytes());
                    }
                    // Holds the connection open, answering nothing.
                    None => std::thread::sleep(Duration::from_secs(5)),
                }
            }
        });
    }
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{NEWCOMER}/24")}]});
    let conf = |socket: &std::path::Path, version: &str| {
        json!({"cniVersion": version, "name": "lab", "type": "zdivert-cni",
               "agent_socket": socket, "timeout_secs": 1, "prevResult": prev.clone()})
        .to_string()
    };
    let run = |stdin: String, netns: Option<&str>| -> anyhow::Result<(bool, serde_json::Value)> {
        let mut cmd = Command::new(zdivert_tests::cni::plugin_bin());
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &pod.container_id)
            .env(
                "CNI_NETNS",
                netns.map_or(pod.pod.ns.path(), std::path::PathBuf::from),
            )
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((out.status.success(), serde_json::from_slice(&out.stdout)?))
    };
    let cases = [
        (
            "malformed stdin",
            "{\"cniVersion\": ".to_string(),
            None,
            6,
            "not a network configuration",
        ),
        ("unknown version", conf(&garbage, "9.9.9"), None, 1, "9.9.9"),
        (
            "missing netns",
            conf(&garbage, "1.0.0"),
            Some("/run/netns/no-such-pod"),
            4,
            "no-such-pod",
        ),
        (
            "garbage answer",
            conf(&garbage, "1.0.0"),
            None,
            100,
            "garbage",
        ),
        ("no answer", conf(&silent, "1.0.0"), None, 11, "no answer"),
    ];
    for (what, stdin, netns, code, names) in cases {
        let (ok, out) = run(stdin, netns)?;
        assert!(!ok, "{what}: succeeded: {out}");
        assert_eq!(out["code"], code, "{what}: {out}");
        assert!(
            out["msg"].as_str().is_some_and(|m| m.contains(names)),
            "{what}: {out}"
        );
        assert!(
            redirection_in(&pod.pod)?.is_empty(),
            "{what}: the netns was changed"
        );
    }
    Ok(())
}

/// install-cni stopped (SIGTERM) while its DaemonSet stays, as in a rolling update: the entry
/// stays, so pods started until the new agent runs wait. Stopped once the DaemonSet is gone (an
/// uninstall): the entry goes, so the node's pods start without zdivert.
#[test]
fn install_cni_takes_the_plugin_out_only_when_its_daemonset_is_gone() -> anyhow::Result<()> {
    let dir = TempDir::new("zdivert-install-cni-stop")?;
    let (bin, conf) = (dir.0.join("bin"), dir.0.join("net.d"));
    std::fs::create_dir_all(&conf)?;
    let list = conf.join("10-kindnet.conflist");
    let primary = json!({"cniVersion": "0.4.0", "name": "kindnet",
                         "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}]});
    std::fs::write(&list, primary.to_string())?;
    let api = FakeApi::start()?;
    let addr = api.listen()?;
    let kubeconfig = FakeApi::write_kubeconfig(&dir.0, "install-cni", addr)?;
    api.apply(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                     "metadata": {"name": "zdivert", "namespace": "istio-system"}}))?;
    let chained_types = || plugin_types(&list);
    let run_and_stop = || -> anyhow::Result<()> {
        // Its copy of the plugin tells when it runs (signals are handled by then).
        let _ = std::fs::remove_dir_all(&bin);
        let mut child = Command::new(zdivert_tests::agent::zdivert_bin())
            .args([
                "install-cni",
                "--uninstall-with-daemonset",
                "istio-system/zdivert",
                "--plugin",
            ])
            .arg(zdivert_tests::cni::plugin_bin())
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let chained = eventually("chained", zdivert_tests::SET_UP_WITHIN, || {
            Ok(bin.join("zdivert-cni").exists() && chained_types()? == ["ptp", "zdivert-cni"])
        });
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        chained?;
        anyhow::ensure!(status.success(), "install-cni exited with {status}");
        Ok(())
    };
    run_and_stop()?;
    assert_eq!(
        chained_types()?,
        ["ptp", "zdivert-cni"],
        "an upgrade keeps the entry"
    );
    api.delete(
        zdivert_tests::fakeapi::Kind::DaemonSet,
        "istio-system",
        "zdivert",
    )?;
    run_and_stop()?;
    assert_eq!(chained_types()?, ["ptp"], "an uninstall takes it out");
    Ok(())
}
