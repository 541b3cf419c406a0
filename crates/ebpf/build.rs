//! Compiles `src/bpf/leakscope.bpf.c` with clang and generates the skeleton.
fn main() {
    leakscope_bpf::build::skeleton(
        "src/bpf/leakscope.bpf.c",
        "leakscope",
        &[
            "src/bpf/events.h",
            "src/bpf/stack.bpf.h",
            "src/bpf/held.bpf.h",
            "src/bpf/path.bpf.h",
            "src/bpf/scm.bpf.h",
        ],
    );
}
