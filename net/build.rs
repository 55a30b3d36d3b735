//! Build script: does nothing unless the `dpdk` feature is on. With it, generates bindings to
//! Debian's DPDK 22.11 (`libdpdk` through pkg-config) from `src/dpdk/wrapper.h`, and
//! compiles the C wrappers bindgen emits for DPDK's static inline functions (`rte_eth_rx_burst`
//! and friends are inline: calling them from Rust needs a compiled copy). The default build
//! needs no DPDK.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_DPDK").is_some() {
        #[cfg(feature = "dpdk")]
        dpdk::generate();
    }
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::path::PathBuf;

    const HEADER: &str = "src/dpdk/wrapper.h";

    pub fn generate() {
        println!("cargo:rerun-if-changed={HEADER}");
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        let lib = pkg_config::Config::new()
            .probe("libdpdk")
            .expect("the dpdk feature needs libdpdk-dev (DPDK 22.11) and pkg-config");
        let wrappers = out.join("dpdk_static_wrappers");
        let mut b = bindgen::Builder::default()
            .header(HEADER)
            .clang_args(["-include", "rte_config.h"])
            .allowlist_function(
                "rte_(eal|eth|pktmbuf|mempool|lcore|socket|strerror|errno|get_tsc|thread_(un)?register).*",
            )
            .allowlist_type("rte_.*")
            .allowlist_var("RTE_.*")
            // Packed structs holding aligned ones do not compile in Rust (E0588).
            .opaque_type("rte_(l2tpv2|gtp)_.*")
            .wrap_static_fns(true)
            .wrap_static_fns_path(&wrappers)
            .generate_comments(false)
            .derive_default(true)
            .layout_tests(false);
        for p in &lib.include_paths {
            b = b.clang_arg(format!("-I{}", p.display()));
        }
        b.generate()
            .expect("bindgen on DPDK headers")
            .write_to_file(out.join("dpdk_bindings.rs"))
            .expect("writing DPDK bindings");
        let mut cc = cc::Build::new();
        cc.file(wrappers.with_extension("c"))
            .include(".")
            .flag("-include")
            .flag("rte_config.h")
            // pkg-config's own baseline; -march=native would break on other CI CPUs.
            .flag("-march=corei7")
            .opt_level(3);
        for p in &lib.include_paths {
            cc.include(p);
        }
        cc.compile("dpdk_static_wrappers");
    }
}
