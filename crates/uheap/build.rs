//! Compiles `src/bpf/uheap.bpf.c` with clang and generates the skeleton.
//! `vmlinux.h` is shared with leakscope-ebpf (`../ebpf/src/bpf`). clang is
//! installed by `scripts/setup`; `LEAKSCOPE_CLANG` picks another one.
use std::{env, path::PathBuf};

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/uheap.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"))
        .join("uheap.skel.rs");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    let arch = match arch.as_str() {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => other,
    };
    let clang = env::var("LEAKSCOPE_CLANG").unwrap_or_else(|_| "clang".into());
    if let Err(e) = SkeletonBuilder::new()
        .source(SRC)
        .clang(&clang)
        .clang_args([
            format!("-D__TARGET_ARCH_{arch}"),
            "-Wall".into(),
            "-mcpu=v3".into(),
            "-Wno-unused-function".into(),
            "-Isrc/bpf".into(),
            "-I../ebpf/src/bpf".into(),
        ])
        .build_and_generate(&out)
    {
        panic!(
            "building the BPF program with `{clang}` failed: {e:#}\n\
             (run scripts/setup to install clang, or set LEAKSCOPE_CLANG)"
        );
    }
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed=src/bpf/uheap.h");
    println!("cargo:rerun-if-changed=../ebpf/src/bpf/vmlinux.h");
    println!("cargo:rerun-if-env-changed=LEAKSCOPE_CLANG");
}
