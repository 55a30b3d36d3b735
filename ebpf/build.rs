//! Compiles the XDP programs in `src/*.bpf.c` with clang (`-target bpf -g -O2`) into
//! `$OUT_DIR`, where `src/lib.rs` embeds them. Rust eBPF would need a nightly toolchain; C
//! objects load the same way through aya. `-g` is required: aya needs the object's BTF for the
//! `.maps` section.

use std::path::PathBuf;
use std::process::Command;

/// The programs built, by file stem.
const PROGRAMS: &[&str] = &["steer"];

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    // Debian keeps asm/types.h under the multiarch directory, which `-target bpf` does not search.
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    for name in PROGRAMS {
        let src = format!("src/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let out = out_dir.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-g", "-O2", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .args(["-c", &src, "-o"])
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{clang} failed on {src} ({s})"),
            Err(e) => panic!(
                "cannot run {clang} ({e}): the XDP programs need clang and libbpf-dev \
                 (bash tools/install-deps.sh installs them)"
            ),
        }
    }
}
