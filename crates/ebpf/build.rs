//! Compiles `src/bpf/leakscope.bpf.c` with clang and generates the skeleton.
fn main() {
    leakscope_bpf::build::skeleton(
        "src/bpf/leakscope.bpf.c",
        "leakscope",
        &["src/bpf/events.h"],
    );
}
