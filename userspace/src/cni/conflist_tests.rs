use super::*;

/// The primary CNIs' files as they ship them.
const FLANNEL: &str = r#"{
  "name": "cbr0", "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;
const CALICO: &str = r#"{
  "name": "k8s-pod-network", "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes", "nodename": "node-1",
     "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"#;
/// Cilium chained behind the AWS VPC CNI (`cni.chainingMode=aws-cni`).
const CILIUM_CHAINED: &str = r#"{
  "cniVersion": "0.4.0", "name": "aws-cni", "disableCheck": true,
  "plugins": [
    {"name": "aws-cni", "type": "aws-cni", "vethPrefix": "eni", "mtu": "9001"},
    {"name": "egress-cni", "type": "egress-cni", "enabled": "false"},
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
    {"name": "cilium", "type": "cilium-cni", "enable-debug": false}
  ]
}"#;
const KINDNET: &str = r#"{
  "cniVersion": "0.3.1", "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
              "routes": [{"dst": "0.0.0.0/0"}], "ranges": [[{"subnet": "10.244.0.0/24"}]]},
     "mtu": 1500},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;
/// A single plugin, as `.conf` files hold it.
const BRIDGE_CONF: &str = r#"{
  "cniVersion": "0.4.0", "name": "bridge", "type": "bridge", "bridge": "cni0", "isGateway": true,
  "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
}"#;

fn ours() -> Value {
    entry(
        Path::new("/var/run/zdivert/cni.sock"),
        &["kube-system".into()],
        None,
    )
}

fn plugin_types(list: &Value) -> Vec<&str> {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect()
}

#[test]
fn chained_last_into_every_usual_primary_list_and_the_rest_untouched() {
    for (file, text, types) in [
        ("10-flannel.conflist", FLANNEL, vec!["flannel", "portmap"]),
        (
            "10-calico.conflist",
            CALICO,
            vec!["calico", "bandwidth", "portmap"],
        ),
        (
            "05-cilium.conflist",
            CILIUM_CHAINED,
            vec!["aws-cni", "egress-cni", "portmap", "cilium-cni"],
        ),
        ("10-kindnet.conflist", KINDNET, vec!["ptp", "portmap"]),
    ] {
        let file = Path::new(file);
        let (target, list) = chain(file, text, &ours()).unwrap();
        assert_eq!(target, file, "a list keeps its name");
        let mut expected = types.clone();
        expected.push(PLUGIN_TYPE);
        assert_eq!(plugin_types(&list), expected, "{}", file.display());
        let original: Value = serde_json::from_str(text).unwrap();
        for (i, p) in original["plugins"].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                &list["plugins"][i],
                p,
                "{}: plugin {i} untouched",
                file.display()
            );
        }
        assert_eq!(list["name"], original["name"]);
        assert!(is_chained(file, &list.to_string(), &ours()));
        // Chaining again changes nothing: one entry, still last.
        let (_, again) = chain(file, &list.to_string(), &ours()).unwrap();
        assert_eq!(again, list);
        // Uninstalling gives back the primary's list.
        assert_eq!(unchain(file, &list.to_string()).unwrap(), Some(original));
    }
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let (target, list) = chain(Path::new("10-bridge.conf"), BRIDGE_CONF, &ours()).unwrap();
    assert_eq!(target, Path::new("10-bridge.conflist"));
    assert_eq!(
        (list["cniVersion"].as_str(), list["name"].as_str()),
        (Some("0.4.0"), Some("bridge"))
    );
    assert_eq!(plugin_types(&list), ["bridge", PLUGIN_TYPE]);
    assert_eq!(list["plugins"][0]["ipam"]["subnet"], "10.22.0.0/16");
    assert!(list["plugins"][0].get("cniVersion").is_none());
}

#[test]
fn a_stale_or_misplaced_entry_is_replaced() {
    // An older entry (another socket), and not last: the primary appended a plugin after it.
    let mut stale: Value = serde_json::from_str(KINDNET).unwrap();
    let old = entry(Path::new("/old.sock"), &[], None);
    stale["plugins"].as_array_mut().unwrap().insert(1, old);
    let file = Path::new("10-kindnet.conflist");
    assert!(!is_chained(file, &stale.to_string(), &ours()));
    let (_, list) = chain(file, &stale.to_string(), &ours()).unwrap();
    assert_eq!(plugin_types(&list), ["ptp", "portmap", PLUGIN_TYPE]);
    assert_eq!(list["plugins"][2], ours());
}

#[test]
fn what_is_not_a_cni_configuration_is_refused_by_name() {
    let file = Path::new("99-x.conf");
    let e = chain(file, "{not json", &ours()).unwrap_err();
    assert!(e.to_string().starts_with("99-x.conf: not JSON"), "{e}");
    let e = chain(file, r#"{"name": "x"}"#, &ours()).unwrap_err();
    assert!(matches!(e, ConflistError::NotCniConfig { .. }), "{e}");
}

#[test]
fn ensure_and_remove_work_on_the_directory_the_runtime_reads() {
    let dir = std::env::temp_dir().join(format!("zdivert-conflist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("10-bridge.conf"), BRIDGE_CONF).unwrap();
    std::fs::write(dir.join("20-later.conflist"), FLANNEL).unwrap();
    let written = ensure(&dir, &ours()).unwrap();
    assert_eq!(written, Some(dir.join("10-bridge.conflist")));
    assert!(
        !dir.join("10-bridge.conf").exists(),
        "the .conf made way for the .conflist"
    );
    assert_eq!(ensure(&dir, &ours()).unwrap(), None, "nothing to do twice");
    // The primary CNI rewrites its file: the entry goes back.
    std::fs::write(dir.join("10-bridge.conflist"), FLANNEL).unwrap();
    assert!(ensure(&dir, &ours()).unwrap().is_some());
    assert_eq!(remove(&dir).unwrap(), [dir.join("10-bridge.conflist")]);
    let back: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("10-bridge.conflist")).unwrap())
            .unwrap();
    assert_eq!(back, serde_json::from_str::<Value>(FLANNEL).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("20-later.conflist")).unwrap(),
        FLANNEL,
        "only the primary file is touched"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
