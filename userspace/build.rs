//! Embeds the eBPF object built by `cargo xtask build-ebpf`. Without it (plain `cargo check`,
//! clippy, a machine without bpf-linker) an empty object is embedded and the agent says so at
//! run time, as aya's own integration tests do.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=ZDIVERT_EBPF_OBJECT");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("zdivert.bpf.o");
    let object = env::var_os("ZDIVERT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
            let target = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("../target"));
            target.join("bpfel-unknown-none/release/zdivert")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: embedding an empty one (run `cargo xtask build-ebpf`)",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
