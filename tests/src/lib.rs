//! Test support for zdivert: simulated nodes in network namespaces (`topology`), workloads
//! (`apps`), the real ztunnel on a simulated node (`ztunnel`), and the agent binary run on a
//! simulated node (`agent`).
pub mod agent;
pub mod apps;
pub mod cni;
pub mod dns;
pub mod fakeapi;
pub mod fallback;
pub mod foreign;
pub mod inpod;
pub mod load;
pub mod ns;
pub mod odd;
pub mod packets;
pub mod raw;
pub mod rollout;
pub mod simopen;
pub mod snapshot;
pub mod testrun;
pub mod topology;
pub mod ztunnel;

/// The object `cargo xtask build-ebpf` builds next to the agent's, holding only `zd_floor`, the
/// program that does nothing (the bench's floor).
pub fn floor_object() -> anyhow::Result<Vec<u8>> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("bpfel-unknown-none/release/zdivert-floor");
    std::fs::read(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (run `cargo xtask build-ebpf`)", path.display()))
}

/// How long a test waits for an agent to set a node up in its mode. A poll: a long deadline
/// costs nothing when the set-up comes. Under QEMU's emulation (`cargo xtask vmtest`) ztunnel's
/// start and the fallback's restores took over 20 s on 6.1 and over 60 s once on 5.10, and on
/// 5.10 a switch from the fallback back to eBPF (its layout removed, the programs verified)
/// took over 20 s.
pub const SET_UP_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// Polls `check` until it holds; fails naming `what` after `within`, with the last error seen.
pub fn eventually(
    what: &str,
    within: std::time::Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    let mut last = String::from("never held");
    while std::time::Instant::now() < deadline {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("{what}: not within {within:?} ({last})")
}

/// A directory of this test's own under the temp dir, removed on drop even when the test fails.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
