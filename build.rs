//! Compiles the XDP program into a libbpf-rs skeleton; the generated Rust
//! types are the ABI between the data plane and the control plane.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/xlb.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo")).join("xlb.skel.rs");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("target arch is set by cargo");
    // Kernel UAPI headers (linux/bpf.h, if_ether.h, ...) live under the
    // multiarch include directory on Debian; a generated vmlinux.h would tie
    // the build to the build host's kernel.
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");

    SkeletonBuilder::new()
        .source(SRC)
        .clang_args(["-O2", "-g", "-mcpu=v3", "-Wall", "-Werror", multiarch.as_str()])
        .build_and_generate(&out)
        .unwrap_or_else(|e| panic!("building {SRC}: {e:#}"));
    println!("cargo:rerun-if-changed=src/bpf");
}
